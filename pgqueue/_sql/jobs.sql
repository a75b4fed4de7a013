-- Jobs: enqueue (one, bulk, unique), read one, cancel, move back from the dead letter, and the
-- operator's one-job writes (run now, copy, delete). {schema} is replaced by the quoted schema
-- name; parameters use psycopg's %(name)s style.

-- ---------------------------------------------------------------- enqueue

-- name: enqueue
-- One job, and what tells a worker of it, in the same statement (Postgres delivers
-- notifications at commit).
-- %(wake_one)s (the statement commits by itself): one worker waiting for jobs of the queue is
-- picked and taken off the waiting list, as wake_one does. With %(handoff)s (the job is due now
-- and is no schedule's fire), on a queue neither paused nor limited, a picked worker that takes
-- hand-offs (its handoff_lease is set) gets the job itself: the row is inserted claimed by it,
-- under token %(token)s and its lease, its start not yet charged (as a prefetched job's is), and
-- the notification carries the row and its lease (!take), so the worker starts it without a
-- claim's round trip (and knows, from the lease, when it was handed over). Otherwise the worker
-- is only woken (!wake), and also when the job would not fit in NOTIFY's 8,000 bytes. No worker
-- waiting: nothing is sent, and the commit skips NOTIFY's lock. See pgqueue.worker.handoff.
-- %(broadcast)s (inside the caller's transaction, which may commit much later): the queue's name
-- goes to every worker listening, at commit; nothing is handed off (a lease written now could
-- be over by then).
WITH pick AS (
    SELECT id, handoff_lease FROM {schema}.workers
    WHERE %(wake_one)s AND waiting_until > now() AND queues && ARRAY[%(queue)s::text]
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), handoff AS (
    SELECT id AS worker_id, handoff_lease AS lease FROM pick
    WHERE %(handoff)s AND handoff_lease IS NOT NULL
      AND NOT EXISTS (SELECT FROM {schema}.queues
                      WHERE name = %(queue)s
                        AND (paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL))
      -- The job's part of the notification, as the server prints it (a number can grow).
      AND CASE WHEN octet_length(%(args)s::text) > 6000 THEN false
               ELSE octet_length(%(task)s::text) + octet_length(%(queue)s::text)
                    + octet_length(%(args)s::jsonb::text) <= 7000 END
), job AS (
    INSERT INTO {schema}.jobs
        (queue, task, args, priority, run_at, max_attempts, timeout, unique_key, scheduled_for,
         state, worker_id, claim_token, lease_expires_at)
    SELECT %(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
           coalesce(%(run_at)s, now() + make_interval(secs => %(delay)s)),
           %(max_attempts)s, %(timeout)s, %(unique_key)s, %(scheduled_for)s,
           CASE WHEN h.worker_id IS NULL THEN 'queued' ELSE 'running' END::{schema}.job_state,
           h.worker_id, CASE WHEN h.worker_id IS NOT NULL THEN %(token)s::uuid END,
           clock_timestamp() + make_interval(secs => h.lease)
    FROM (SELECT) AS one LEFT JOIN handoff AS h ON true
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING id, queue, task, args, priority, attempts, max_attempts, timeout, worker_id,
              claim_token, lease_expires_at
), woken AS (
    UPDATE {schema}.workers AS w SET waiting_until = NULL
    FROM pick
    WHERE w.id = pick.id AND EXISTS (SELECT FROM job)
    RETURNING w.id
)
SELECT job.id,
       CASE WHEN %(broadcast)s THEN pg_notify(%(channel)s, job.queue)
            WHEN job.worker_id IS NOT NULL THEN pg_notify(
                %(channel)s,
                '!take ' || job.worker_id || ' ' || json_build_object(
                    'id', job.id, 'token', job.claim_token, 'queue', job.queue, 'task', job.task,
                    'args', job.args, 'priority', job.priority, 'attempt', job.attempts,
                    'max_attempts', job.max_attempts, 'timeout', job.timeout,
                    'lease', extract(epoch FROM job.lease_expires_at))::text)
            ELSE (SELECT pg_notify(%(channel)s, '!wake ' || woken.id) FROM woken) END AS woke
FROM job

-- name: find_unique
-- The live job holding a unique key (every row of jobs is live: finished ones have moved out).
SELECT id FROM {schema}.jobs WHERE queue = %(queue)s AND unique_key = %(unique_key)s

-- name: reserve_ids
-- Ids for a bulk COPY, handed out by the table's own identity sequence, and the transaction's clock.
-- The sequence is looked up once (MATERIALIZED): as nextval's argument the lookup ran per id, a
-- catalog scan each time, and cost 3-4 ms per 1,000 ids; the ids alone cost under 0.5 ms.
WITH seq AS MATERIALIZED (
    SELECT pg_get_serial_sequence('{schema}.jobs', 'id')::regclass AS name
)
SELECT now() AS now,
       array(SELECT nextval(seq.name) FROM seq, generate_series(1, %(count)s)) AS ids

-- name: copy_jobs
COPY {schema}.jobs (id, queue, task, args, priority, run_at, max_attempts, timeout, scheduled_for)
FROM STDIN

-- name: copy_jobs_due_now
-- A batch whose every job runs at once: run_at takes its default, now(), the transaction's clock
-- (the one delays resolve against), instead of a timestamp the server parses per row.
COPY {schema}.jobs (id, queue, task, args, priority, max_attempts, timeout, scheduled_for)
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
ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id

-- name: find_unique_many
SELECT id, queue, unique_key FROM {schema}.jobs
WHERE (queue, unique_key) IN (SELECT * FROM unnest(%(queue)s::text[], %(unique_key)s::text[]))

-- ---------------------------------------------------------------- read, cancel, retry

-- name: get_job
-- A live, finished or dead-lettered job: the columns of pgqueue.jobs.Job, then what only the
-- admin shows (lease, cancel flag, and "delayed" judged by the database's clock, as the job list
-- does).
SELECT id, queue, task, args, priority, state::text AS state, run_at, attempts, max_attempts,
       timeout, unique_key, scheduled_for, worker_id, progress, result, errors, created_at,
       started_at, finished_at, lease_expires_at, cancel_requested,
       state = 'queued' AND run_at > now() AS delayed
FROM {schema}.jobs WHERE id = %(id)s
UNION ALL
SELECT id, queue, task, args, priority, state::text, run_at, attempts, max_attempts, timeout,
       unique_key, scheduled_for, worker_id, progress, result, errors, created_at, started_at,
       finished_at, NULL, false, false
FROM {schema}.finished_jobs WHERE id = %(id)s
UNION ALL
SELECT id, queue, task, args, priority, 'dead', NULL, attempts, max_attempts, timeout,
       unique_key, scheduled_for, NULL, progress, NULL, errors, created_at, started_at, failed_at,
       NULL, false, false
FROM {schema}.dead_letter WHERE id = %(id)s

-- name: cancel_jobs
-- One job by %(id)s, or the live jobs holding %(unique_key)s (in %(queue)s, or in any queue when
-- it is NULL); the selector not used is NULL. A queued job is cancelled at once (it moves to
-- finished_jobs); a running one is flagged and its worker stops it (however that attempt ends,
-- short of completing, the job then ends cancelled: ack, rescue_expired). The rows are locked first,
-- so each is judged by its state once no claim or finish is under way on it. The selectors are
-- two arms of an OR so that each keeps its index under a generic plan (primary key; unique key),
-- where `%(id)s IS NULL OR id = %(id)s` would scan the table.
WITH chosen AS (
    SELECT id, state FROM {schema}.jobs
    WHERE id = %(id)s::bigint
       OR (unique_key = %(unique_key)s::text AND (%(queue)s::text IS NULL OR queue = %(queue)s))
    FOR UPDATE
), flagged AS (
    UPDATE {schema}.jobs AS j SET cancel_requested = true
    FROM chosen AS c
    WHERE j.id = c.id AND c.state = 'running'
    RETURNING j.id, pg_notify(%(channel)s, '!cancel ' || j.id) AS woke
), withdrawn AS (
    DELETE FROM {schema}.jobs AS j USING chosen AS c
    WHERE j.id = c.id AND c.state = 'queued'
    RETURNING j.*, NULL::jsonb AS last_error
), cancelled AS (
    {record_cancelled}
)
SELECT id, woke FROM flagged
UNION ALL
SELECT id, NULL FROM cancelled

-- name: retry_dead
-- Moves dead-lettered jobs back into the queue with fresh attempts, keeping their ids and history.
-- One live job per unique key: a job whose key a live job holds meanwhile stays dead, and of
-- dead jobs sharing a key only the newest is moved by a bulk retry.
WITH moved AS (
    DELETE FROM {schema}.dead_letter AS d
    WHERE (%(id)s::bigint IS NULL OR d.id = %(id)s) AND (%(queue)s::text IS NULL OR d.queue = %(queue)s)
      AND NOT EXISTS (SELECT 1 FROM {schema}.jobs AS j
                      WHERE j.queue = d.queue AND j.unique_key = d.unique_key)
      AND (%(id)s::bigint IS NOT NULL
           OR NOT EXISTS (SELECT 1 FROM {schema}.dead_letter AS newer
                          WHERE newer.queue = d.queue AND newer.unique_key = d.unique_key
                            AND newer.id > d.id))
    RETURNING d.*
)
INSERT INTO {schema}.jobs
    (id, queue, task, args, priority, run_at, max_attempts, timeout, unique_key, scheduled_for,
     errors, created_at)
SELECT id, queue, task, args, priority, now(), max_attempts, timeout, unique_key, scheduled_for,
       errors, created_at
FROM moved
RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, queue) END AS woke

-- ---------------------------------------------------------------- the operator's writes

-- name: run_now
-- A waiting job (delayed, or backing off before a retry) becomes due at once.
UPDATE {schema}.jobs SET run_at = now()
WHERE id = %(id)s AND state = 'queued'
RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, queue) END AS woke

-- name: run_retrying
-- Every job of a queue that is backing off after a failure becomes due now (one wake-up).
WITH due AS (
    UPDATE {schema}.jobs SET run_at = now()
    WHERE queue = %(queue)s AND state = 'queued' AND attempts > 0 AND run_at > now()
    RETURNING id
)
SELECT count(*), CASE WHEN %(notify)s AND count(*) > 0 THEN pg_notify(%(channel)s, %(queue)s) END
FROM due

-- name: copy_finished_job
-- "Retry" of a finished job: a new job with the same task, arguments and options (a new id,
-- fresh attempts); the original stays as history. A live job holding the same unique key wins.
INSERT INTO {schema}.jobs (queue, task, args, priority, max_attempts, timeout, unique_key)
SELECT queue, task, args, priority, max_attempts, timeout, unique_key
FROM {schema}.finished_jobs
WHERE id = %(id)s
ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, queue) END AS woke

-- name: delete_job
-- Removes a job row for good: a dead-lettered one, and when %(live)s (not only the dead letter)
-- also a queued or finished one. A running job is left alone (its worker still holds it): cancel it first. Returns how
-- many rows went.
WITH live AS (
    DELETE FROM {schema}.jobs WHERE %(live)s::bool AND id = %(id)s AND state = 'queued' RETURNING id
), finished AS (
    DELETE FROM {schema}.finished_jobs WHERE %(live)s::bool AND id = %(id)s RETURNING id
), dead AS (
    DELETE FROM {schema}.dead_letter WHERE id = %(id)s RETURNING id
)
SELECT (SELECT count(*) FROM live) + (SELECT count(*) FROM finished) + (SELECT count(*) FROM dead)
