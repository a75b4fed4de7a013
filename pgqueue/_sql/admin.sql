-- The admin app's own reads (pgqueue.admin.readmodel): timings, throughput, failures, metrics
-- deltas, the job list, workers. It reads counts, one job and schedules through the shared
-- statements (queues.sql, jobs.sql, schedules.sql), and writes through the client or the
-- statements of jobs.sql and maintenance.sql. {schema} is replaced by the quoted schema name;
-- parameters use psycopg's %(name)s style. A NULL filter parameter means "any".

-- ---------------------------------------------------------------- queues

-- name: admin_queue_runs
-- Run time (last attempt: started_at to finished_at) of the jobs each queue completed within
-- the window; one index range per queue on finished_jobs_queue_idx.
SELECT q.name, r.count, r.avg, r.p95
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT count(*) AS count, avg(secs)::float8 AS avg,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY secs)::float8 AS p95
    FROM (
        SELECT extract(epoch FROM finished_at - started_at)::float8 AS secs
        FROM {schema}.finished_jobs
        WHERE queue = q.name AND state = 'completed' AND started_at IS NOT NULL
          AND finished_at >= now() - make_interval(secs => %(window)s)
          -- a hand-written ±infinity: PostgreSQL before 17 refuses to subtract it
          AND isfinite(started_at) AND isfinite(finished_at)
    ) AS recent
) AS r

-- name: admin_throughput
-- Jobs completed per minute, for the last %(minutes)s minutes: rows of (queue, minutes ago,
-- count); minutes without completions are absent.
SELECT q.name, t.ago, t.count
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT floor(extract(epoch FROM now() - finished_at) / 60)::int AS ago, count(*) AS count
    FROM {schema}.finished_jobs
    WHERE queue = q.name AND state = 'completed'
      AND finished_at > now() - make_interval(mins => %(minutes)s)
      AND finished_at <= now()  -- a hand-written 'infinity' must not break the cast above
    GROUP BY 1
) AS t

-- name: admin_worker_seen
-- Seconds since any worker serving each queue last sent a heartbeat.
SELECT q.name, extract(epoch FROM now() - max(w.heartbeat_at))::float8 AS age
FROM {schema}.workers AS w CROSS JOIN LATERAL unnest(w.queues) AS q(name)
GROUP BY q.name

-- name: admin_failures
-- Failed attempts per queue whose error was recorded within [since, until] (default: the last
-- %(window)s seconds). Only rows that can hold such an error are read: live jobs, jobs that
-- finished since, and jobs dead-lettered since.
WITH bounds AS (
    SELECT coalesce(%(since)s::timestamptz, now() - make_interval(secs => %(window)s)) AS since,
           coalesce(%(until)s::timestamptz, now()) AS until
), candidates AS (
    SELECT j.queue, j.errors FROM {schema}.jobs AS j
    WHERE j.errors <> '[]'::jsonb
    UNION ALL
    SELECT f.queue, f.errors FROM {schema}.finished_jobs AS f, bounds AS b
    WHERE f.finished_at >= b.since AND f.errors <> '[]'::jsonb
    UNION ALL
    SELECT d.queue, d.errors FROM {schema}.dead_letter AS d, bounds AS b
    WHERE d.failed_at >= b.since
), stamped AS (
    SELECT c.queue,
           CASE WHEN e.value ->> 'at' ~ '^\d{4}-\d\d-\d\d[T ]\d\d:\d\d'
                THEN (e.value ->> 'at')::timestamptz END AS at
    FROM candidates AS c CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(c.errors) = 'array' THEN c.errors ELSE '[]'::jsonb END) AS e
)
SELECT s.queue, count(*) AS failures
FROM stamped AS s, bounds AS b
WHERE s.at > b.since AND s.at <= b.until
GROUP BY s.queue

-- name: admin_finished_between
-- Jobs that finished in (since, until], per queue and outcome, with their run times bucketed
-- by the given upper bounds (width_bucket: the number of bounds <= the run time). Feeds the
-- Prometheus counters and histogram, which add these deltas scrape after scrape.
SELECT q.name, f.outcome, f.bucket, f.count, f.seconds
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT state::text AS outcome,
           width_bucket(extract(epoch FROM finished_at - coalesce(started_at, finished_at))::float8,
                        %(bounds)s::float8[]) AS bucket,
           count(*) AS count,
           sum(extract(epoch FROM finished_at - coalesce(started_at, finished_at)))::float8
               AS seconds
    FROM {schema}.finished_jobs
    WHERE queue = q.name AND state IN ('completed', 'cancelled')
      AND finished_at > %(since)s AND finished_at <= %(until)s
    GROUP BY 1, 2
) AS f

-- name: admin_dead_between
SELECT queue, count(*) AS count FROM {schema}.dead_letter
WHERE failed_at > %(since)s AND failed_at <= %(until)s
GROUP BY queue

-- name: admin_clock
-- The database's clock, less a lag that lets transactions still committing rows stamped
-- before it land first.
SELECT now() - make_interval(secs => %(lag)s) AS until

-- ---------------------------------------------------------------- jobs

-- name: admin_list_jobs
-- Newest first, keyset-paginated on id (each branch walks its primary key backwards and stops
-- after %(limit)s matches). %(state)s is one of queued, delayed, retrying, running, completed,
-- cancelled, dead, or NULL for all; %(live)s, %(finished)s and %(dead)s say which tables can hold
-- it; the time range applies to created_at.
(
    SELECT id, queue, task,
           CASE WHEN state = 'queued' AND run_at > now() THEN 'delayed' ELSE state::text END
               AS state,
           priority, attempts, max_attempts, run_at, created_at, started_at, finished_at,
           worker_id, errors -> -1 ->> 'message' AS last_error
    FROM {schema}.jobs
    WHERE %(live)s
      {listed_job}
      AND (%(state)s::text IS NULL
           OR (%(state)s = 'queued' AND state = 'queued' AND run_at <= now())
           OR (%(state)s = 'delayed' AND state = 'queued' AND run_at > now())
           OR (%(state)s = 'retrying' AND state = 'queued' AND attempts > 0)
           OR (%(state)s = 'running' AND state = 'running'))
    ORDER BY id DESC
    LIMIT %(limit)s
)
UNION ALL
(
    SELECT id, queue, task, state::text, priority, attempts, max_attempts, run_at, created_at,
           started_at, finished_at, worker_id, errors -> -1 ->> 'message'
    FROM {schema}.finished_jobs
    WHERE %(finished)s
      {listed_job}
      AND (%(state)s::text IS NULL OR state::text = %(state)s)
    ORDER BY id DESC
    LIMIT %(limit)s
)
UNION ALL
(
    SELECT id, queue, task, 'dead', priority, attempts, max_attempts, NULL, created_at,
           started_at, failed_at, NULL, errors -> -1 ->> 'message'
    FROM {schema}.dead_letter
    WHERE %(dead)s
      {listed_job}
    ORDER BY id DESC
    LIMIT %(limit)s
)
ORDER BY id DESC
LIMIT %(limit)s

-- fragment: listed_job
-- The job list's filters every table shares: the cursor, queue, task and creation time range.
AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
AND (%(queue)s::text IS NULL OR queue = %(queue)s)
AND (%(task)s::text IS NULL OR task = %(task)s)
AND (%(created_after)s::timestamptz IS NULL OR created_at >= %(created_after)s)
AND (%(created_before)s::timestamptz IS NULL OR created_at < %(created_before)s)

-- ---------------------------------------------------------------- workers

-- name: admin_workers
-- Every registered worker with its heartbeat age and the running jobs it holds.
SELECT w.id, w.host, w.pid, w.queues, w.concurrency, w.started_at, w.heartbeat_at,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age,
       coalesce(r.running, 0) AS running, coalesce(r.ids, '{}') AS job_ids
FROM {schema}.workers AS w
LEFT JOIN (
    SELECT worker_id, count(*) AS running, (array_agg(id ORDER BY id))[1:50] AS ids
    FROM {schema}.jobs WHERE state = 'running'
    GROUP BY worker_id
) AS r ON r.worker_id = w.id
ORDER BY w.started_at, w.id

-- ---------------------------------------------------------------- health

-- name: admin_live_workers
SELECT count(*) FROM {schema}.workers
WHERE heartbeat_at > now() - make_interval(secs => %(stale)s)

-- name: admin_abandoned_threads
-- Sync handlers that ran past their timeout keep a worker thread (and a slot) until they end;
-- workers report how many in their heartbeat. Only live workers count: a dead one's threads
-- died with it.
SELECT coalesce(sum(abandoned_threads), 0) FROM {schema}.workers
WHERE heartbeat_at > now() - make_interval(secs => %(stale)s)
