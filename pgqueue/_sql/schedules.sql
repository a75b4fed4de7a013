-- Recurring schedules (the `schedules` table) and the fire-time claim that makes each fire
-- enqueue exactly once, however many scheduler processes run.

-- name: upsert_schedule
-- Declarations from code refresh the definition but keep a pause set at run time.
INSERT INTO {schema}.schedules AS s
    (name, task, args, queue, priority, max_attempts, cron, every_seconds, timezone, paused,
     misfire_policy, misfire_grace_seconds, from_code, next_fire_at)
VALUES (%(name)s, %(task)s, %(args)s::jsonb, %(queue)s, %(priority)s, %(max_attempts)s, %(cron)s,
        %(every_seconds)s, %(timezone)s, %(paused)s, %(misfire_policy)s,
        %(misfire_grace_seconds)s, %(from_code)s, %(next_fire_at)s)
ON CONFLICT (name) DO UPDATE SET
    task = excluded.task, args = excluded.args, queue = excluded.queue,
    priority = excluded.priority, max_attempts = excluded.max_attempts, cron = excluded.cron,
    every_seconds = excluded.every_seconds, timezone = excluded.timezone,
    paused = CASE WHEN excluded.from_code THEN s.paused ELSE excluded.paused END,
    misfire_policy = excluded.misfire_policy,
    misfire_grace_seconds = excluded.misfire_grace_seconds, from_code = excluded.from_code,
    next_fire_at = excluded.next_fire_at, updated_at = now()
RETURNING (xmax = 0) AS inserted

-- name: delete_stale_code_schedules
-- Schedules once declared in code and no longer there.
DELETE FROM {schema}.schedules WHERE from_code AND NOT (name = ANY(%(names)s)) RETURNING name

-- name: list_schedules
SELECT name, task, args, cron, every_seconds, timezone, queue, priority, max_attempts, paused,
       misfire_policy, misfire_grace_seconds, next_fire_at, last_fire_at, updated_at
FROM {schema}.schedules ORDER BY name

-- name: set_schedule_paused
UPDATE {schema}.schedules SET paused = %(paused)s, updated_at = now()
WHERE name = %(name)s RETURNING name

-- name: delete_schedule
DELETE FROM {schema}.schedules WHERE name = %(name)s RETURNING name

-- name: claim_fire
-- The first scheduler to record this fire time wins; the others find last_fire_at already
-- there and enqueue nothing. Runs in the same transaction as the enqueue it guards.
UPDATE {schema}.schedules
SET last_fire_at = %(fire_at)s, next_fire_at = %(next_fire_at)s
WHERE name = %(name)s AND NOT paused AND (last_fire_at IS NULL OR last_fire_at < %(fire_at)s)
RETURNING task, args, queue, priority, max_attempts

-- name: set_next_fire
UPDATE {schema}.schedules SET next_fire_at = %(next_fire_at)s
WHERE name = %(name)s AND next_fire_at IS DISTINCT FROM %(next_fire_at)s

