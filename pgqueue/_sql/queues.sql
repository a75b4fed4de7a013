-- Queues: the cross-worker settings (the `queues` table), the wake-ups that tell workers to
-- look again, and the per-queue counts. {schema} is replaced by the quoted schema name;
-- parameters use psycopg's %(name)s style.

-- ---------------------------------------------------------------- settings

-- name: queue_settings
-- The columns of pgqueue._base.QueueSettings, by name, as set_queue returns them.
SELECT name, paused, concurrency, rate_limit FROM {schema}.queues WHERE name = ANY(%(queues)s)

-- name: set_queue
-- Upsert one queue's cross-process settings; NULL arguments leave a setting as it is unless
-- the matching clear flag is set.
INSERT INTO {schema}.queues AS q (name, paused, concurrency, rate_limit, rate_tokens,
                                  keep_completed, keep_completed_count, keep_dead)
VALUES (%(name)s, coalesce(%(paused)s::bool, false), %(concurrency)s::int, %(rate_limit)s::float8,
        coalesce(%(rate_limit)s::float8, 0), make_interval(secs => %(keep_completed)s::float8),
        %(keep_completed_count)s::int, make_interval(secs => %(keep_dead)s::float8))
ON CONFLICT (name) DO UPDATE SET
    paused = coalesce(%(paused)s::bool, q.paused),
    concurrency = CASE WHEN %(clear_concurrency)s::bool THEN NULL
                       ELSE coalesce(%(concurrency)s::int, q.concurrency) END,
    rate_limit = CASE WHEN %(clear_rate_limit)s::bool THEN NULL
                      ELSE coalesce(%(rate_limit)s::float8, q.rate_limit) END,
    keep_completed = coalesce(make_interval(secs => %(keep_completed)s::float8), q.keep_completed),
    keep_completed_count = coalesce(%(keep_completed_count)s::int, q.keep_completed_count),
    keep_dead = coalesce(make_interval(secs => %(keep_dead)s::float8), q.keep_dead),
    updated_at = now()
RETURNING name, paused, concurrency, rate_limit

-- ---------------------------------------------------------------- wake-ups

-- name: wake_queues
-- Wakes the workers of %(queues)s: with %(wake_one)s one waiting worker (wake_one), else one
-- notification per name on the schema's channel, for every worker listening (also how control
-- messages, e.g. a settings change, are sent). Inside a transaction Postgres delivers them at
-- commit, identical ones folded.
WITH woken AS (
    {wake_one}
)
SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q WHERE NOT %(wake_one)s

-- fragment: wake_one
-- Wakes one worker waiting for jobs of %(queues)s (when %(wake_one)s; never %(waker)s itself):
-- takes it off the waiting list and notifies it alone, so an enqueue sets off one claim, not one
-- per idle worker. A row another transaction is waking is skipped: that worker is being woken.
-- With no worker waiting (all busy: each claims again as soon as it has room) nothing is sent,
-- and the commit skips NOTIFY's cluster-wide lock. A worker is waiting from its unsaturated
-- claim (start_waiting) until woken, saturated, or its lease runs out unrenewed (a dead worker
-- is not woken for long).
UPDATE {schema}.workers AS w SET waiting_until = NULL
FROM (
    SELECT id FROM {schema}.workers
    WHERE %(wake_one)s AND waiting_until > now() AND queues && %(queues)s::text[]
      AND id <> %(waker)s
    LIMIT 1
    FOR UPDATE SKIP LOCKED
) AS pick
WHERE w.id = pick.id
RETURNING pg_notify(%(channel)s, '!wake ' || w.id)

-- ---------------------------------------------------------------- counts

-- name: queue_overview
-- Per queue: jobs by state, where "queued" is due now, "delayed" waits for its run_at and
-- "retrying" (a subset of both) has failed at least once; "completed" and "cancelled" are
-- finished_jobs, "dead" the dead-letter table; the age of the longest-waiting due job; the
-- queue's settings. Queues known only from their settings row show up with zeros. Exact counts
-- cost one scan of the jobs table (as small as the backlog) and one index scan of the kept
-- history (retention bounds it).
WITH live AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) AS queued,
           count(*) FILTER (WHERE state = 'queued' AND run_at > now()) AS delayed,
           count(*) FILTER (WHERE state = 'queued' AND attempts > 0) AS retrying,
           count(*) FILTER (WHERE state = 'running') AS running,
           -- isfinite: a hand-written -infinity (PostgreSQL before 17 cannot subtract it)
           extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'queued'
                                                          AND run_at <= now()
                                                          AND isfinite(run_at)))::float8
               AS oldest_waiting
    FROM {schema}.jobs GROUP BY queue
), finished AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'completed') AS completed,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled
    FROM {schema}.finished_jobs GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead FROM {schema}.dead_letter GROUP BY queue
), names AS (
    SELECT queue FROM live UNION SELECT queue FROM finished UNION SELECT queue FROM dead
    UNION SELECT name FROM {schema}.queues
)
SELECT n.queue,
       coalesce(l.queued, 0) AS queued, coalesce(l.delayed, 0) AS delayed,
       coalesce(l.retrying, 0) AS retrying, coalesce(l.running, 0) AS running,
       coalesce(f.completed, 0) AS completed, coalesce(f.cancelled, 0) AS cancelled,
       coalesce(d.dead, 0) AS dead, l.oldest_waiting,
       coalesce(q.paused, false) AS paused, q.concurrency, q.rate_limit
FROM names AS n
LEFT JOIN live AS l USING (queue)
LEFT JOIN finished AS f USING (queue)
LEFT JOIN dead AS d USING (queue)
LEFT JOIN {schema}.queues AS q ON q.name = n.queue
ORDER BY n.queue
