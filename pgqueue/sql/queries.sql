-- pgqueue's SQL, one named statement per block. {schema} is replaced by the quoted schema name;
-- parameters use psycopg's %(name)s style.

-- name: enqueue
-- One job; the NOTIFY rides in the same statement and Postgres delivers it only at commit
-- (and folds identical ones, so a transaction wakes each queue at most once).
INSERT INTO {schema}.jobs
    (queue, task, args, priority, run_at, max_attempts, timeout, unique_key, scheduled_for)
VALUES (%(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
        coalesce(%(run_at)s, now() + make_interval(secs => %(delay)s)),
        %(max_attempts)s, %(timeout)s, %(unique_key)s, %(scheduled_for)s)
ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')
DO NOTHING
RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, queue) END AS woke

-- name: find_unique
SELECT id FROM {schema}.jobs
WHERE queue = %(queue)s AND unique_key = %(unique_key)s AND state IN ('queued', 'running')

-- name: reserve_ids
-- Ids for a bulk COPY, handed out by the table's own identity sequence, and the transaction's clock.
SELECT now() AS now,
       array(SELECT nextval(pg_get_serial_sequence('{schema}.jobs', 'id'))
             FROM generate_series(1, %(count)s)) AS ids

-- name: copy_jobs
COPY {schema}.jobs (id, queue, task, args, priority, run_at, max_attempts, timeout, scheduled_for)
FROM STDIN

-- name: enqueue_many_unique
-- Bulk enqueue when some jobs carry a unique key: rows that conflict are skipped (ids come from
-- reserve_ids, so the caller knows which were inserted) and the holders are looked up.
INSERT INTO {schema}.jobs
    (id, queue, task, args, priority, run_at, max_attempts, timeout, unique_key, scheduled_for)
SELECT id, queue, task, args, priority, coalesce(run_at, now() + make_interval(secs => delay)),
       max_attempts, timeout, unique_key, scheduled_for
FROM unnest(%(id)s::bigint[], %(queue)s::text[], %(task)s::text[], %(args)s::jsonb[],
            %(priority)s::smallint[], %(run_at)s::timestamptz[], %(delay)s::float8[],
            %(max_attempts)s::int[], %(timeout)s::float8[], %(unique_key)s::text[],
            %(scheduled_for)s::timestamptz[])
     AS t(id, queue, task, args, priority, run_at, delay, max_attempts, timeout, unique_key,
          scheduled_for)
ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')
DO NOTHING
RETURNING id

-- name: find_unique_many
SELECT id, queue, unique_key FROM {schema}.jobs
WHERE (queue, unique_key) IN (SELECT * FROM unnest(%(queue)s::text[], %(unique_key)s::text[]))
  AND state IN ('queued', 'running')

-- name: notify_queues
SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q

-- name: get_job
SELECT id, queue, task, args, priority, state::text AS state, run_at, attempts, max_attempts,
       timeout, unique_key, scheduled_for, worker_id, progress, result, errors, created_at,
       started_at, finished_at
FROM {schema}.jobs WHERE id = %(id)s
UNION ALL
SELECT id, queue, task, args, priority, 'dead', NULL, attempts, max_attempts, timeout,
       unique_key, scheduled_for, NULL, progress, NULL, errors, created_at, started_at, failed_at
FROM {schema}.dead_letter WHERE id = %(id)s

-- name: cancel
-- A queued job is cancelled at once; a running one is flagged and its worker stops it.
UPDATE {schema}.jobs
SET state = CASE WHEN state = 'queued' THEN 'cancelled'::{schema}.job_state ELSE state END,
    finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END,
    cancel_requested = (state = 'running')
WHERE id = %(id)s AND state IN ('queued', 'running')
RETURNING id

-- name: cancel_by_key
UPDATE {schema}.jobs
SET state = CASE WHEN state = 'queued' THEN 'cancelled'::{schema}.job_state ELSE state END,
    finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END,
    cancel_requested = (state = 'running')
WHERE unique_key = %(unique_key)s AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND state IN ('queued', 'running')
RETURNING id

-- name: retry_dead
-- Moves dead-lettered jobs back into the queue with fresh attempts, keeping their ids and history.
WITH moved AS (
    DELETE FROM {schema}.dead_letter
    WHERE (%(id)s::bigint IS NULL OR id = %(id)s) AND (%(queue)s::text IS NULL OR queue = %(queue)s)
    RETURNING *
)
INSERT INTO {schema}.jobs
    (id, queue, task, args, priority, run_at, max_attempts, timeout, unique_key, scheduled_for,
     errors, created_at)
SELECT id, queue, task, args, priority, now(), max_attempts, timeout, unique_key, scheduled_for,
       errors, created_at
FROM moved
RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, queue) END AS woke

-- name: schema_version
SELECT version_num FROM {schema}.alembic_version
