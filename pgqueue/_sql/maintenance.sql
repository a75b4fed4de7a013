-- Maintenance, run by any worker: rescue of expired leases, retention (pruning), and the
-- batched deletes the admin's "clean" shares with the pruner. {schema} is replaced by the quoted
-- schema name; parameters use psycopg's %(name)s style.

-- ---------------------------------------------------------------- rescue

-- name: expired_leases
-- The rescuer's sighting: running jobs whose lease has run out, oldest first. Nothing is
-- rescued on sight: a lease that lapsed while its owner could not renew (an outage, a stalled
-- server, a lock on jobs) is renewed as soon as the owner can, and the rescuer takes only what
-- it has seen expired and unchanged for its grace (rescue_expired; pgqueue.worker.rescuer).
-- A running row with no lease at all (written by hand) counts as expired, or it would run for
-- ever. Both tests are conditions of the running index, not filters: a filter fetched the row of
-- every entry, and under churn the index holds many dead ones (12.7 ms a round instead of 0.06
-- at 12,000 jobs/s; the entries of finished jobs carry leases still in the future: skipped).
(SELECT id, claim_token AS token, lease_expires_at AS lease FROM {schema}.jobs
 WHERE state = 'running' AND lease_expires_at IS NULL
 LIMIT %(limit)s)
UNION ALL
(SELECT id, claim_token, lease_expires_at FROM {schema}.jobs
 WHERE state = 'running' AND lease_expires_at < now()
 ORDER BY lease_expires_at
 LIMIT %(limit)s)
LIMIT %(limit)s

-- name: rescue_expired
-- Jobs whose worker stopped renewing the lease (killed, partitioned) go back to the queue; the
-- lost attempt counts, and a job with none left is dead-lettered, all in one statement.
-- Only the sightings in %(ids)s/%(tokens)s/%(leases)s whose lease has not moved since are
-- taken: an owner that renewed in the meantime, or is renewing now (the row is locked), keeps
-- its job. A renewal only moves a lease later; "not later than sighted" rather than "equal"
-- also matches a lease the client could only read clamped (-infinity, a BC date, by hand).
-- A job whose start was never recorded (it sat in the worker's prefetch buffer, or had just
-- left it) lost nothing: it goes back uncharged, its loss counted in unrecorded_losses.
-- Only a job that keeps taking workers down that way, more than max_attempts + 2 times, is
-- dead-lettered: a poison job ends even when it kills its worker before its start is written.
-- A job asked to cancel ends cancelled instead, neither run again nor dead-lettered; its flag is
-- read from the row as locked, so a cancel committed since the statement began is seen.
WITH expired AS (
    SELECT j.id, j.cancel_requested AS cancelled
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(leases)s::timestamptz[])
             AS seen(id, token, lease)
    JOIN {schema}.jobs AS j ON j.id = seen.id
    WHERE j.state = 'running' AND j.claim_token IS NOT DISTINCT FROM seen.token
      AND coalesce(j.lease_expires_at, '-infinity') <= coalesce(seen.lease, '-infinity')
      AND coalesce(j.lease_expires_at, '-infinity') < clock_timestamp()
    FOR UPDATE OF j SKIP LOCKED
), lost AS (
    SELECT j.id, expired.cancelled, j.started_at IS NULL AS unrecorded,
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
        claim_token = NULL, unrecorded_losses = j.unrecorded_losses + lost.unrecorded::int,
        errors = CASE WHEN lost.unrecorded THEN j.errors ELSE j.errors || lost.error END
    FROM lost
    WHERE j.id = lost.id AND NOT lost.exhausted AND NOT lost.cancelled
    RETURNING j.id, j.queue
), dead AS (
    -- Nothing to charge: a lost attempt was counted when it started (or, unrecorded, not at all).
    DELETE FROM {schema}.jobs AS j USING lost
    WHERE j.id = lost.id AND lost.exhausted AND NOT lost.cancelled
    RETURNING j.*, lost.error AS last_error, 0 AS charge, NULL::timestamptz AS run_started_at
), buried AS (
    {bury_dead}
), withdrawn AS (
    DELETE FROM {schema}.jobs AS j USING lost
    WHERE j.id = lost.id AND lost.cancelled
    RETURNING j.*, lost.error AS last_error
), cancelled AS (
    {record_cancelled}
)
SELECT (SELECT array_agg(DISTINCT queue) FROM requeued) AS queues,
       (SELECT count(*) FROM requeued) AS requeued, (SELECT count(*) FROM buried) AS buried,
       (SELECT count(*) FROM cancelled) AS cancelled

-- name: forget_dead_workers
DELETE FROM {schema}.workers
WHERE heartbeat_at < now() - make_interval(secs => %(after)s)

-- ---------------------------------------------------------------- retention

-- name: try_maintenance_lock
-- One worker at a time runs pruning; the others skip the round instead of queueing behind it.
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s))

-- name: delete_finished_jobs
-- One batch of completed and cancelled jobs that finished before the cut-off: %(older_than)s
-- seconds ago, or the queue's own keep_completed where %(queue_retention)s (the pruner; the
-- admin's clean passes false). %(states)s narrows the states, %(queue)s the queue (NULL: all).
-- Small batches keep locks short: the caller repeats until fewer than the limit were removed.
-- Retention never touches the jobs table: finished jobs live in finished_jobs. The first
-- finished_at bound (the shortest retention of any queue, or the cut-off) is what lets the read
-- be a range of finished_jobs_age_idx, oldest first; the second applies each row's own queue.
DELETE FROM {schema}.finished_jobs
WHERE id IN (
    SELECT f.id FROM {schema}.finished_jobs AS f
    LEFT JOIN {schema}.queues AS q ON q.name = f.queue
    WHERE f.finished_at < now() - (
              SELECT least(make_interval(secs => %(older_than)s::float8),
                           min(keep_completed) FILTER (WHERE %(queue_retention)s::bool))
              FROM {schema}.queues)
      AND f.finished_at < now() - coalesce(CASE WHEN %(queue_retention)s::bool THEN q.keep_completed END,
                                           make_interval(secs => %(older_than)s::float8))
      AND f.state = ANY(%(states)s::text[]::{schema}.job_state[])
      AND (%(queue)s::text IS NULL OR f.queue = %(queue)s)
    LIMIT %(limit)s
    FOR UPDATE OF f SKIP LOCKED
)

-- name: prune_completed_count
-- Per-queue count caps (keep only the newest N finished rows), for queues that set one.
DELETE FROM {schema}.finished_jobs
WHERE id IN (
    SELECT id FROM (
        SELECT f.id, row_number() OVER (PARTITION BY f.queue ORDER BY f.finished_at DESC) AS rank,
               q.keep_completed_count
        FROM {schema}.finished_jobs AS f JOIN {schema}.queues AS q ON q.name = f.queue
        WHERE q.keep_completed_count IS NOT NULL
    ) AS ranked
    WHERE rank > keep_completed_count
    LIMIT %(limit)s
)

-- name: delete_dead_jobs
-- One batch of dead-lettered jobs that died before the cut-off: %(older_than)s seconds ago
-- (NULL: never), or the queue's own keep_dead where %(queue_retention)s and it is set; %(queue)s
-- narrows the queue (NULL: all). The caller repeats until a batch comes back short.
DELETE FROM {schema}.dead_letter
WHERE id IN (
    SELECT d.id FROM {schema}.dead_letter AS d
    LEFT JOIN {schema}.queues AS q ON q.name = d.queue
    WHERE (%(queue)s::text IS NULL OR d.queue = %(queue)s)
      AND d.failed_at < now() - coalesce(CASE WHEN %(queue_retention)s::bool THEN q.keep_dead END,
                                         make_interval(secs => %(older_than)s::float8))
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED
)
