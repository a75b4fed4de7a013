-- The worker's statements: claim, acknowledge (outcomes and starts), heartbeat and leases,
-- progress, registration. {schema} is replaced by the quoted schema name; parameters use
-- psycopg's %(name)s style (%(name)b: binary). LISTEN is built in pgqueue.worker.listener (an
-- identifier, not a parameter); the wake-ups the worker sends are queues.sql's wake_queues.

-- ---------------------------------------------------------------- claim

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
-- Both claim statements return the columns of pgqueue.worker.execution.ClaimedJob, by name.
WITH candidates AS (
    SELECT c.id, c.ctid, row_number() OVER (ORDER BY c.turn, q.pos) AS rank
    FROM (
        SELECT u.*, %(limit)s::int AS n
        FROM unnest(%(queues)s::text[], %(weights)s::float8[], %(vtimes)s::float8[])
             WITH ORDINALITY AS u(name, weight, vtime, pos)
        -- Queues with a global cap or rate limit are claimed only through claim_limited.
        WHERE u.name NOT IN (SELECT name FROM {schema}.queues
                             WHERE paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL)
    ) AS q
    CROSS JOIN LATERAL (
        SELECT l.id, l.ctid, q.vtime + row_number() OVER (ORDER BY l.priority, l.run_at, l.id) / q.weight
                   AS turn
        FROM (
            {runnable}
        ) AS l
    ) AS c
    ORDER BY c.turn, q.pos
    LIMIT %(limit)s
), started AS (
    -- The rows are updated where the lock above found them (a locked row cannot move): a join
    -- by id lets the planner hash the whole jobs table for a batch of a few hundred (a third
    -- of the claim's time on 8,000 rows, and growing with the table).
    UPDATE {schema}.jobs AS j
    SET state = 'running', worker_id = %(worker_id)s, claim_token = %(token)s,
        attempts = j.attempts + 1, started_at = now(),
        lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM candidates WHERE rank <= %(start)s))
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts AS attempt, j.max_attempts,
              j.timeout, j.scheduled_for, true AS started
), buffered AS (
    UPDATE {schema}.jobs AS j
    SET state = 'running', worker_id = %(worker_id)s, claim_token = %(token)s, started_at = NULL,
        lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM candidates WHERE rank > %(start)s))
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts AS attempt, j.max_attempts,
              j.timeout, j.scheduled_for, false AS started
)
SELECT claimed.*
FROM (SELECT * FROM started UNION ALL SELECT * FROM buffered) AS claimed
JOIN candidates USING (id)
ORDER BY candidates.rank

-- fragment: runnable
-- The best runnable jobs of queue q.name (priority, then run time, then id), at most q.n, locked
-- with SKIP LOCKED (with their row addresses, where the claim updates them). One index range per priority level, each ending where the delayed jobs of
-- that level begin: jobs waiting for a later run time, at any priority, are never read, so a
-- claim costs ten short index descents however many delayed jobs wait (one range over the whole
-- queue would walk every delayed job of a better priority to reach the ready ones). The levels
-- are read in order and the outer LIMIT stops reading (and locking) once it has q.n rows.
SELECT r.id, r.ctid, r.priority, r.run_at
FROM generate_series(1, 10) AS p(priority)
CROSS JOIN LATERAL (
    SELECT id, ctid, priority, run_at FROM {schema}.jobs
    WHERE state = 'queued' AND queue = q.name AND priority = p.priority AND run_at <= now()
    ORDER BY run_at, id
    LIMIT q.n
    FOR UPDATE SKIP LOCKED
) AS r
LIMIT q.n

-- name: start_waiting
-- The worker has room and its last claim found less than it asked for: producers may wake it,
-- or hand it a job, now (wake_one, enqueue). No row yet (the first heartbeat has not run):
-- nothing, and it polls. The server's clock comes back with the answer: the worker judges a
-- hand-off's age by it (see pgqueue.worker.handoff).
UPDATE {schema}.workers SET waiting_until = now() + make_interval(secs => %(lease)s)
WHERE id = %(worker_id)s
RETURNING extract(epoch FROM clock_timestamp())::float8

-- name: release_missed_handoffs
-- Jobs handed to this worker (claimed for it, never started, not held) before %(since)s go back,
-- uncharged: after the listener (re)connected, those whose notification was sent to a
-- connection that was gone (a hand-off committed since is on its way and will be taken); at a
-- graceful stop, after every outcome, all of them (an enqueue that picked the worker just as it
-- left the waiting list, its notification too late to be read). A job is handed over with this
-- worker's lease from its insert, and no renewal moves a job the worker does not hold: its
-- insert is before %(since)s when its lease ends before %(since)s + the lease.
-- One asked to cancel meanwhile (its notification as lost as the hand-off's) ends cancelled.
WITH missed AS (
    SELECT id, cancel_requested FROM {schema}.jobs
    WHERE state = 'running' AND worker_id = %(worker_id)s AND started_at IS NULL
      AND lease_expires_at < %(since)s::timestamptz + make_interval(secs => %(lease)s)
      AND id <> ALL(%(held)s::bigint[])
    FOR UPDATE
), released AS (
    UPDATE {schema}.jobs
    SET state = 'queued', run_at = now(), worker_id = NULL, lease_expires_at = NULL, claim_token = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM missed WHERE NOT cancel_requested))
    RETURNING queue
), withdrawn AS (
    DELETE FROM {schema}.jobs WHERE id = ANY(ARRAY(SELECT id FROM missed WHERE cancel_requested))
    RETURNING *, NULL::jsonb AS last_error
), cancelled AS (
    {record_cancelled}
)
SELECT queue FROM released

-- name: stop_waiting
-- The worker is busy again (a claim got all it asked for): wake-ups should go to others.
UPDATE {schema}.workers SET waiting_until = NULL
WHERE id = %(worker_id)s AND waiting_until IS NOT NULL

-- name: pass_wake
-- A worker that filled every slot and left jobs behind (its claim was saturated) wakes one
-- waiting worker of its queues, which does the same in turn: a burst spreads over idle workers
-- one claim at a time, without a herd.
WITH woken AS (
    {wake_one}
)
SELECT count(*) FROM woken

-- name: lock_queue
-- Serialises claims on a queue with a global cap or rate limit; the next statement then sees
-- every claim committed before it (a fresh snapshot), so the cap holds across workers.
SELECT name FROM {schema}.queues WHERE name = %(queue)s FOR UPDATE

-- name: claim_limited
WITH settings AS (
    -- tokens: NULL without a rate limit (least and greatest skip NULLs, so without the CASE
    -- a queue with only a cap would get a budget of one job per claim).
    SELECT name, concurrency, rate_limit,
           CASE WHEN rate_limit IS NOT NULL THEN
               least(greatest(rate_limit * %(burst)s, 1),
                     rate_tokens + extract(epoch FROM clock_timestamp() - rate_updated_at) * rate_limit)
           END AS tokens
    FROM {schema}.queues WHERE name = %(queue)s AND NOT paused
), budget AS (
    SELECT greatest(0, least(
        %(limit)s,
        coalesce(s.concurrency - (SELECT count(*) FROM {schema}.jobs
                                  WHERE state = 'running' AND queue = s.name), %(limit)s),
        coalesce(floor(s.tokens)::int, %(limit)s))) AS n
    FROM settings AS s
), candidates AS (
    SELECT l.ctid
    -- No budget row (the queue is paused): nothing, where a NULL limit would mean no limit.
    FROM (SELECT %(queue)s::text AS name, coalesce((SELECT n FROM budget), 0) AS n) AS q
    CROSS JOIN LATERAL (
        {runnable}
    ) AS l
), claimed AS (
    -- Capped and rate-limited queues claim only what starts at once: charged here.
    UPDATE {schema}.jobs AS j
    SET state = 'running', attempts = j.attempts + 1, started_at = now(),
        worker_id = %(worker_id)s, claim_token = %(token)s,
        lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM candidates))  -- where the lock found them, as claim does
    RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts AS attempt, j.max_attempts,
              j.timeout, j.scheduled_for, true AS started
), spent AS (
    UPDATE {schema}.queues AS q
    SET rate_tokens = s.tokens - (SELECT count(*) FROM claimed), rate_updated_at = clock_timestamp()
    FROM settings AS s
    WHERE q.name = s.name AND s.rate_limit IS NOT NULL
)
SELECT * FROM claimed

-- name: next_run_at
-- Seconds until the next delayed job of these queues falls due (by the database's clock), or
-- since a job fell due that the worker's last claim, begun %(looked_ago)s seconds ago, could
-- not have seen (negative: claim again at once).
SELECT extract(epoch FROM min(n.run_at) - clock_timestamp())::float8
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN generate_series(1, 10) AS p(priority)
CROSS JOIN LATERAL (
    SELECT run_at FROM {schema}.jobs
    WHERE state = 'queued' AND queue = q.name AND priority = p.priority
      AND run_at > now() - make_interval(secs => %(looked_ago)s)
    ORDER BY run_at LIMIT 1
) AS n

-- ---------------------------------------------------------------- acknowledge

-- name: ack
-- Every outcome buffered since the last flush, in one statement. Each row names the claim it
-- finished (its token): a worker that lost its lease (and so its job) cannot overwrite a later
-- run, even one that restarted the attempt count after a retry from the dead letter.
-- Rows are matched by id and token alone: every way back to the queue clears the token, so a
-- row holding it is running. (A state condition once let the planner use the partial index of
-- running jobs and scan all of them for each outcome, with statistics taken while the jobs were
-- queued.)
-- Kinds: completed, cancelled, retry, dead; requeue (a started attempt handed back at shutdown:
-- it does not count) and release (a prefetched job that never started).
-- `charge` is 1 for a job that started from the prefetch buffer and whose start this statement
-- records along with its outcome (idempotent: a start already written is not charged again).
-- The same statement records the starts (start_*) of prefetched jobs still running, so a job
-- that crashes its worker has, in all likelihood, paid for it.
-- jobs holds only live jobs, so autovacuum often analyses it while it is empty; planned from
-- that, a join of jobs with the outcomes scanned jobs and, for each of its rows, the whole
-- outcome list (100 outcomes on 400 rows: 40 ms, not 2). So every outcome's row is looked up
-- through the primary key (LATERAL fixes that order) and locked; the jobs that leave (finished
-- or dead, nearly every outcome) are then deleted by id, the ones going back updated by id,
-- with no join for the planner to choose. Give-backs and starts run only when the flush holds
-- some.
-- Numbers, tokens and kinds arrive as array literals (text the worker joins, ten times cheaper
-- than the driver's arrays); JSON values and times as the driver's arrays.
WITH outcome AS (
    SELECT * FROM unnest(%(id)s::bigint[], %(token)s::uuid[], %(kind)s::text[],
                         %(result)b::jsonb[], %(error)b::jsonb[], %(delay)s::float8[],
                         %(charge)s::int[], %(started_at)b::timestamptz[])
        AS o(id, token, kind, result, error, delay, charge, started_at)
), held AS MATERIALIZED (
    -- Every outcome's row, locked: nothing changes it before the writes below (a row the lease
    -- keeper renewed meanwhile is found at its newest version, and still holds the token).
    -- A job asked to cancel never goes back to the queue nor to the dead letter, whatever its
    -- attempt says (a failure, a hand-back at shutdown, a release before it started: the
    -- worker may not have heard of the cancel yet); it ends cancelled, keeping the attempt's
    -- error. Only a completed attempt stays completed: its work is done. The flag is read from
    -- the locked row, so a cancel committed while this statement waited for it is seen.
    SELECT j.*,
           CASE WHEN j.cancel_requested AND o.kind <> 'completed' THEN 'cancelled' ELSE o.kind END AS kind,
           o.result AS outcome_result, o.error, o.delay, o.charge, o.started_at AS run_started_at
    FROM outcome AS o
    CROSS JOIN LATERAL (
        SELECT * FROM {schema}.jobs WHERE id = o.id AND claim_token = o.token FOR UPDATE
    ) AS j
), leaving AS (
    SELECT * FROM held WHERE kind IN ('completed', 'cancelled', 'dead')
), deleted AS (
    -- A finished job leaves jobs (a delete writes no index entry) for finished_jobs, a dead one
    -- for the dead letter.
    DELETE FROM {schema}.jobs WHERE id = ANY(ARRAY(SELECT id FROM leaving))
), done AS (
    INSERT INTO {schema}.finished_jobs
        (id, queue, task, args, priority, state, run_at, attempts, max_attempts, timeout,
         unique_key, scheduled_for, worker_id, progress, result, errors, created_at, started_at,
         finished_at, unrecorded_losses)
    SELECT id, queue, task, args, priority, kind::{schema}.job_state, run_at,
           attempts + charge * (started_at IS NULL)::int, max_attempts, timeout, unique_key,
           scheduled_for, worker_id, progress, outcome_result,
           CASE WHEN error IS NULL THEN errors ELSE errors || error END, created_at,
           coalesce(started_at, run_started_at), now(), unrecorded_losses
    FROM leaving WHERE kind IN ('completed', 'cancelled')
    RETURNING id
), retried AS (
    -- Looked up by key (the ids as an array, as for the delete), then joined to their outcomes.
    UPDATE {schema}.jobs AS j
    SET state = 'queued', run_at = now() + make_interval(secs => h.delay), worker_id = NULL,
        lease_expires_at = NULL, claim_token = NULL,
        started_at = coalesce(j.started_at, h.run_started_at),
        errors = CASE WHEN h.error IS NULL THEN j.errors ELSE j.errors || h.error END,
        attempts = j.attempts + h.charge * (j.started_at IS NULL)::int - (h.kind = 'requeue')::int
    FROM held AS h
    WHERE %(kind)s::text[] && ARRAY['retry', 'requeue', 'release']
      AND j.id = ANY(ARRAY(SELECT id FROM held WHERE kind IN ('retry', 'requeue', 'release')))
      AND h.id = j.id AND h.kind IN ('retry', 'requeue', 'release')
    RETURNING j.id
), dead AS (
    SELECT *, error AS last_error FROM leaving WHERE kind = 'dead'
), buried AS (
    {bury_dead}
), started AS (
    UPDATE {schema}.jobs AS j
    SET attempts = j.attempts + 1, started_at = s.started_at
    FROM unnest(%(start_id)s::bigint[], %(start_token)s::uuid[], %(start_at)b::timestamptz[])
        AS s(id, token, started_at)
    WHERE cardinality(%(start_id)s::bigint[]) > 0
      AND j.id = s.id AND j.claim_token = s.token AND j.started_at IS NULL
    RETURNING j.id
)
SELECT (SELECT count(*) FROM done) + (SELECT count(*) FROM retried) + (SELECT count(*) FROM buried)
       + (SELECT count(*) FROM started)

-- fragment: bury_dead
-- The dead-letter INSERT, shared by ack and rescue_expired: the rows a `dead` CTE deleted from
-- jobs, each with its last_error (appended to its errors; NULL: none), charge (1 when this
-- statement also records the job's start, which charges the attempt) and run_started_at (that
-- start).
INSERT INTO {schema}.dead_letter
    (id, queue, task, args, priority, attempts, max_attempts, timeout, unique_key,
     scheduled_for, progress, errors, created_at, started_at)
SELECT id, queue, task, args, priority, attempts + charge * (started_at IS NULL)::int,
       max_attempts, timeout, unique_key, scheduled_for, progress,
       errors || coalesce(last_error, '[]'::jsonb), created_at, coalesce(started_at, run_started_at)
FROM dead
RETURNING id

-- fragment: record_cancelled
-- The finished_jobs INSERT of jobs that end cancelled outside the ack, shared by cancel_jobs,
-- rescue_expired and release_missed_handoffs: the rows a `withdrawn` CTE deleted from jobs, each
-- with its last_error (appended to its errors; NULL: none).
INSERT INTO {schema}.finished_jobs
    (id, queue, task, args, priority, state, run_at, attempts, max_attempts, timeout,
     unique_key, scheduled_for, worker_id, progress, result, errors, created_at, started_at,
     finished_at, unrecorded_losses)
SELECT id, queue, task, args, priority, 'cancelled', run_at, attempts, max_attempts, timeout,
       unique_key, scheduled_for, worker_id, progress, result,
       errors || coalesce(last_error, '[]'::jsonb), created_at, started_at, now(), unrecorded_losses
FROM withdrawn
RETURNING id

-- ---------------------------------------------------------------- liveness

-- name: heartbeat
-- Renews the leases of the claims this worker holds and reports which were asked to cancel;
-- a held claim missing from the answer was lost (its lease expired and it was rescued).
-- Every lease runs from the moment it is written (clock_timestamp()), not from when the
-- statement was sent (now()): a renewal or a claim that waited behind a lock on jobs longer than
-- the lease would otherwise write a lease already over, and the next rescue round would hand
-- jobs still running here to another worker.
WITH beat AS (
    INSERT INTO {schema}.workers (id, host, pid, queues, concurrency, abandoned_threads, handoff_lease)
    VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, %(abandoned)s, %(lease)s)
    ON CONFLICT (id) DO UPDATE
    SET heartbeat_at = now(), abandoned_threads = %(abandoned)s, handoff_lease = %(lease)s,
        waiting_until = CASE WHEN workers.waiting_until IS NOT NULL
                             THEN now() + make_interval(secs => %(lease)s) END
)
UPDATE {schema}.jobs AS j
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
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

-- ---------------------------------------------------------------- registration

-- name: schema_version
-- The migration the schema is at: a worker checks it before registering, the admin's readiness
-- probe compares it with the head migration.
SELECT version_num FROM {schema}.alembic_version
