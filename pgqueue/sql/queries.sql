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
RETURNING id, CASE WHEN state = 'running' THEN pg_notify(%(channel)s, '!cancel ' || id) END AS woke

-- name: cancel_by_key
UPDATE {schema}.jobs
SET state = CASE WHEN state = 'queued' THEN 'cancelled'::{schema}.job_state ELSE state END,
    finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END,
    cancel_requested = (state = 'running')
WHERE unique_key = %(unique_key)s AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND state IN ('queued', 'running')
RETURNING id, CASE WHEN state = 'running' THEN pg_notify(%(channel)s, '!cancel ' || id) END AS woke

-- name: retry_dead
-- Moves dead-lettered jobs back into the queue with fresh attempts, keeping their ids and history.
-- One live job per unique key: a job whose key a live job holds meanwhile stays dead, and of
-- dead jobs sharing a key only the newest is moved by a bulk retry.
WITH moved AS (
    DELETE FROM {schema}.dead_letter AS d
    WHERE (%(id)s::bigint IS NULL OR d.id = %(id)s) AND (%(queue)s::text IS NULL OR d.queue = %(queue)s)
      AND NOT EXISTS (SELECT 1 FROM {schema}.jobs AS j
                      WHERE j.queue = d.queue AND j.unique_key = d.unique_key
                        AND j.state IN ('queued', 'running'))
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

-- name: schema_version
SELECT version_num FROM {schema}.alembic_version

-- ---------------------------------------------------------------- worker: claim

-- name: claim
-- One statement claims a batch: per queue the best runnable rows (priority, then run time, then
-- id) are locked with SKIP LOCKED through the claim index, then dealt out across the queues by
-- stride: a queue's n-th row comes at vtime + n / weight (the worker keeps each queue's virtual
-- time across claims), so a backlog in one queue never makes another queue's jobs wait for it,
-- and a queue of weight w gets w rows for each one of weight 1. Priority orders jobs within a
-- queue, not across queues.
-- Paused and limited queues are skipped here, in the same statement, so a pause or a new cap
-- takes effect at once even for a worker whose cached settings are stale.
-- The first %(start)s rows start at once and are charged an attempt; the rest wait in the
-- worker's prefetch buffer uncharged (the ack statement charges them once they start), so a
-- worker killed with a full buffer costs those jobs nothing. Every row carries the claim's token.
WITH candidates AS (
    SELECT c.id, row_number() OVER (ORDER BY c.turn, q.pos) AS rank
    FROM unnest(%(queues)s::text[], %(weights)s::float8[], %(vtimes)s::float8[])
         WITH ORDINALITY AS q(name, weight, vtime, pos)
    CROSS JOIN LATERAL (
        SELECT l.id, q.vtime + row_number() OVER (ORDER BY l.priority, l.run_at, l.id) / q.weight
                   AS turn
        FROM (
            SELECT id, priority, run_at FROM {schema}.jobs
            WHERE state = 'queued' AND queue = q.name AND run_at <= now()
            ORDER BY priority, run_at, id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) AS l
    ) AS c
    -- Queues with a global cap or rate limit are claimed only through claim_limited.
    WHERE q.name NOT IN (SELECT name FROM {schema}.queues
                         WHERE paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL)
    ORDER BY c.turn, q.pos
    LIMIT %(limit)s
)
UPDATE {schema}.jobs AS j
SET state = 'running', worker_id = %(worker_id)s, claim_token = %(token)s,
    attempts = j.attempts + (candidates.rank <= %(start)s)::int,
    started_at = CASE WHEN candidates.rank <= %(start)s THEN now() END,
    lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM candidates
WHERE j.id = candidates.id
RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts, j.timeout,
          j.scheduled_for, candidates.rank <= %(start)s AS started

-- name: lock_queue
-- Serialises claims on a queue with a global cap or rate limit; the next statement then sees
-- every claim committed before it (a fresh snapshot), so the cap holds across workers.
SELECT name FROM {schema}.queues WHERE name = %(queue)s FOR UPDATE

-- name: claim_limited
WITH settings AS (
    SELECT name, concurrency, rate_limit,
           least(greatest(rate_limit * %(burst)s, 1),
                 rate_tokens + extract(epoch FROM clock_timestamp() - rate_updated_at) * rate_limit)
               AS tokens
    FROM {schema}.queues WHERE name = %(queue)s AND NOT paused
), budget AS (
    SELECT greatest(0, least(
        %(limit)s,
        coalesce(s.concurrency - (SELECT count(*) FROM {schema}.jobs
                                  WHERE state = 'running' AND queue = s.name), %(limit)s),
        coalesce(floor(s.tokens)::int, %(limit)s))) AS n
    FROM settings AS s
), candidates AS (
    SELECT id FROM {schema}.jobs
    WHERE state = 'queued' AND queue = %(queue)s AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT (SELECT n FROM budget)
    FOR UPDATE SKIP LOCKED
), claimed AS (
    -- Capped and rate-limited queues claim only what starts at once: charged here.
    UPDATE {schema}.jobs AS j
    SET state = 'running', attempts = j.attempts + 1, started_at = now(),
        worker_id = %(worker_id)s, claim_token = %(token)s,
        lease_expires_at = now() + make_interval(secs => %(lease)s)
    FROM candidates
    WHERE j.id = candidates.id
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts, j.timeout,
              j.scheduled_for, true AS started
), spent AS (
    UPDATE {schema}.queues AS q
    SET rate_tokens = s.tokens - (SELECT count(*) FROM claimed), rate_updated_at = clock_timestamp()
    FROM settings AS s
    WHERE q.name = s.name AND s.rate_limit IS NOT NULL
)
SELECT * FROM claimed

-- name: queue_settings
SELECT name, paused, concurrency, rate_limit FROM {schema}.queues WHERE name = ANY(%(queues)s)

-- name: next_run_at
-- Seconds until the next delayed job of these queues falls due (by the database's clock).
SELECT extract(epoch FROM min(n.run_at) - clock_timestamp())::float8
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN generate_series(1, 10) AS p(priority)
CROSS JOIN LATERAL (
    SELECT run_at FROM {schema}.jobs
    WHERE state = 'queued' AND queue = q.name AND priority = p.priority AND run_at > now()
    ORDER BY run_at LIMIT 1
) AS n

-- ---------------------------------------------------------------- worker: acknowledge

-- name: ack
-- Every outcome buffered since the last flush, in one statement. Each row names the claim it
-- finished (its token): a worker that lost its lease (and so its job) cannot overwrite a later
-- run, even one that restarted the attempt count after a retry from the dead letter.
-- `state::text` keeps the planner off the partial index of running jobs: statistics taken while
-- the jobs were queued say "almost none running", and a plan built on that scans every running
-- row for each outcome. Joined through the primary key instead, a flush costs one lookup a job.
-- Kinds: completed, cancelled, retry, dead; requeue (a started attempt handed back at shutdown:
-- it does not count) and release (a prefetched job that never started).
-- `charge` is 1 for a job that started from the prefetch buffer and whose start this statement
-- records along with its outcome (idempotent: a start already written is not charged again). The same statement records the starts (start_*) of prefetched
-- jobs still running, so a job that crashes its worker has, in all likelihood, paid for it.
WITH outcome AS (
    SELECT * FROM unnest(%(id)b::bigint[], %(token)b::uuid[], %(kind)b::text[],
                         %(result)b::jsonb[], %(error)b::jsonb[], %(delay)b::float8[],
                         %(charge)b::int[], %(started_at)b::timestamptz[])
        AS o(id, token, kind, result, error, delay, charge, started_at)
), done AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE o.kind WHEN 'cancelled' THEN 'cancelled'::{schema}.job_state
                            ELSE 'completed'::{schema}.job_state END,
        result = o.result, finished_at = now(), lease_expires_at = NULL, claim_token = NULL,
        attempts = j.attempts + o.charge * (j.started_at IS NULL)::int,
        started_at = coalesce(j.started_at, o.started_at),
        errors = CASE WHEN o.error IS NULL THEN j.errors ELSE j.errors || o.error END
    FROM outcome AS o
    WHERE o.kind IN ('completed', 'cancelled') AND j.id = o.id AND j.claim_token = o.token
      AND j.state::text = 'running'
    RETURNING j.id
), retried AS (
    UPDATE {schema}.jobs AS j
    SET state = 'queued', run_at = now() + make_interval(secs => o.delay), worker_id = NULL,
        lease_expires_at = NULL, cancel_requested = false, claim_token = NULL,
        started_at = coalesce(j.started_at, o.started_at),
        errors = CASE WHEN o.error IS NULL THEN j.errors ELSE j.errors || o.error END,
        attempts = j.attempts + o.charge * (j.started_at IS NULL)::int - (o.kind = 'requeue')::int
    FROM outcome AS o
    WHERE o.kind IN ('retry', 'requeue', 'release') AND j.id = o.id AND j.claim_token = o.token
      AND j.state::text = 'running'
    RETURNING j.id
), dead AS (
    DELETE FROM {schema}.jobs AS j
    USING outcome AS o
    WHERE o.kind = 'dead' AND j.id = o.id AND j.claim_token = o.token
      AND j.state::text = 'running'
    RETURNING j.*, o.error AS last_error, o.charge, o.started_at AS run_started_at
), buried AS (
    INSERT INTO {schema}.dead_letter
        (id, queue, task, args, priority, attempts, max_attempts, timeout, unique_key,
         scheduled_for, progress, errors, created_at, started_at)
    SELECT id, queue, task, args, priority, attempts + charge * (started_at IS NULL)::int,
           max_attempts, timeout, unique_key, scheduled_for, progress,
           errors || coalesce(last_error, '[]'::jsonb), created_at, coalesce(started_at, run_started_at)
    FROM dead
    RETURNING id
), started AS (
    UPDATE {schema}.jobs AS j
    SET attempts = j.attempts + 1, started_at = s.started_at
    FROM unnest(%(start_id)b::bigint[], %(start_token)b::uuid[], %(start_at)b::timestamptz[])
        AS s(id, token, started_at)
    WHERE j.id = s.id AND j.claim_token = s.token AND j.state::text = 'running'
      AND j.started_at IS NULL
    RETURNING j.id
)
SELECT (SELECT count(*) FROM done) + (SELECT count(*) FROM retried) + (SELECT count(*) FROM buried)
       + (SELECT count(*) FROM started)

-- name: wake_queues
SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q

-- ---------------------------------------------------------------- worker: liveness

-- name: heartbeat
-- Renews the leases of the claims this worker holds and reports which were asked to cancel;
-- a held claim missing from the answer was lost (its lease expired and it was rescued).
WITH beat AS (
    INSERT INTO {schema}.workers (id, host, pid, queues, concurrency, abandoned_threads)
    VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, %(abandoned)s)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), abandoned_threads = %(abandoned)s
)
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM unnest(%(held)s::bigint[], %(token)s::uuid[]) AS h(id, token)
WHERE j.id = h.id AND j.claim_token = h.token AND j.state = 'running'
  AND j.worker_id = %(id)s
RETURNING j.id, j.cancel_requested

-- name: save_progress
UPDATE {schema}.jobs AS j SET progress = p.progress
FROM unnest(%(id)s::bigint[], %(token)s::uuid[], %(progress)s::jsonb[]) AS p(id, token, progress)
WHERE j.id = p.id AND j.claim_token = p.token AND j.state::text = 'running'

-- name: deregister_worker
DELETE FROM {schema}.workers WHERE id = %(id)s

-- ---------------------------------------------------------------- maintenance

-- name: rescue_expired
-- Jobs whose worker stopped renewing the lease (killed, partitioned) go back to the queue; the
-- lost attempt counts, and a job with none left is dead-lettered, all in one statement.
-- A job whose start was never recorded (it sat in the worker's prefetch buffer, or had just
-- left it) lost nothing: it goes back uncharged, its loss counted in unrecorded_losses. Only a
-- job that keeps taking workers down that way, more than max_attempts + 2 times, is
-- dead-lettered: a poison job ends even when it kills its worker before its start is written.
WITH expired AS (
    SELECT id FROM {schema}.jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), lost AS (
    SELECT j.id, j.started_at IS NULL AS unrecorded,
           CASE WHEN j.started_at IS NULL THEN j.unrecorded_losses >= j.max_attempts + 2
                ELSE j.attempts >= j.max_attempts END AS exhausted,
           jsonb_build_object('attempt', j.attempts, 'at', now(), 'type', 'LeaseExpired',
                              'message', 'worker ' || coalesce(j.worker_id, '?')
                                         || ' stopped renewing its lease'
                                         || CASE WHEN j.started_at IS NULL
                                                 THEN ' before the job''s start was recorded ('
                                                      || (j.unrecorded_losses + 1)
                                                      || ' such losses)'
                                                 ELSE '' END,
                              'traceback', NULL) AS error
    FROM {schema}.jobs AS j JOIN expired USING (id)
), requeued AS (
    UPDATE {schema}.jobs AS j
    SET state = 'queued', run_at = now(), worker_id = NULL, lease_expires_at = NULL,
        cancel_requested = false, claim_token = NULL,
        unrecorded_losses = j.unrecorded_losses + lost.unrecorded::int,
        errors = CASE WHEN lost.unrecorded THEN j.errors ELSE j.errors || lost.error END
    FROM lost
    WHERE j.id = lost.id AND NOT lost.exhausted
    RETURNING j.id, j.queue
), dead AS (
    DELETE FROM {schema}.jobs AS j USING lost
    WHERE j.id = lost.id AND lost.exhausted
    RETURNING j.*, lost.error AS last_error
), buried AS (
    INSERT INTO {schema}.dead_letter
        (id, queue, task, args, priority, attempts, max_attempts, timeout, unique_key,
         scheduled_for, progress, errors, created_at, started_at)
    SELECT id, queue, task, args, priority, attempts, max_attempts, timeout, unique_key,
           scheduled_for, progress, errors || last_error, created_at, started_at
    FROM dead
    RETURNING id
)
SELECT (SELECT array_agg(DISTINCT queue) FROM requeued) AS queues,
       (SELECT count(*) FROM requeued) AS requeued, (SELECT count(*) FROM buried) AS buried

-- name: forget_dead_workers
DELETE FROM {schema}.workers
WHERE heartbeat_at < now() - make_interval(secs => %(after)s)

-- name: try_maintenance_lock
-- One worker at a time runs pruning; the others skip the round instead of queueing behind it.
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s))

-- name: prune_completed
-- Small batches keep locks short: the caller repeats until fewer than the limit were removed.
DELETE FROM {schema}.jobs
WHERE id IN (
    SELECT j.id FROM {schema}.jobs AS j
    LEFT JOIN {schema}.queues AS q ON q.name = j.queue
    WHERE j.state IN ('completed', 'cancelled')
      AND j.finished_at < now() - coalesce(q.keep_completed, make_interval(secs => %(keep_seconds)s))
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)

-- name: prune_completed_count
-- Per-queue count caps (keep only the newest N finished rows), for queues that set one.
DELETE FROM {schema}.jobs
WHERE id IN (
    SELECT id FROM (
        SELECT j.id, row_number() OVER (PARTITION BY j.queue ORDER BY j.finished_at DESC) AS rank,
               q.keep_completed_count
        FROM {schema}.jobs AS j JOIN {schema}.queues AS q ON q.name = j.queue
        WHERE q.keep_completed_count IS NOT NULL AND j.state IN ('completed', 'cancelled')
    ) AS ranked
    WHERE rank > keep_completed_count
    LIMIT %(limit)s
)

-- name: prune_dead
DELETE FROM {schema}.dead_letter
WHERE id IN (
    SELECT d.id FROM {schema}.dead_letter AS d JOIN {schema}.queues AS q ON q.name = d.queue
    WHERE q.keep_dead IS NOT NULL AND d.failed_at < now() - q.keep_dead
    LIMIT %(limit)s
)

-- ---------------------------------------------------------------- queue settings

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

-- ---------------------------------------------------------------- statistics

-- name: queue_counts
-- Counts per queue and state; "delayed" is queued with a future run time, "dead" is the
-- dead-letter table. Queues known only from settings show up with zeros.
WITH live AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) AS queued,
           count(*) FILTER (WHERE state = 'queued' AND run_at > now()) AS delayed,
           count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state = 'completed') AS completed,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled
    FROM {schema}.jobs GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead FROM {schema}.dead_letter GROUP BY queue
), names AS (
    SELECT queue FROM live UNION SELECT queue FROM dead UNION SELECT name FROM {schema}.queues
)
SELECT n.queue, coalesce(l.queued, 0), coalesce(l.delayed, 0), coalesce(l.running, 0),
       coalesce(l.completed, 0), coalesce(l.cancelled, 0), coalesce(d.dead, 0)
FROM names AS n LEFT JOIN live AS l USING (queue) LEFT JOIN dead AS d USING (queue)
ORDER BY n.queue
