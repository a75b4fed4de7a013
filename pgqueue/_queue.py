"""The synchronous queue: what a (threaded) app uses to enqueue, inspect and cancel jobs.

Generated from :mod:`pgqueue._aqueue` by ``tools/async_to_sync.py``: edit that file and run the
tool; CI fails when this one differs from what the tool writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from typing_extensions import Unpack

from pgqueue import _enqueue as ops
from pgqueue._base import KEEP, UNIQUE_RACE_RETRIES, Keep, QueueBase, QueueSettings
from pgqueue._connections import (
    CHECKOUT_SLICE,
    POOL_WAIT,
    READ_ONLY_DRAIN_INTERVAL,
    RECONNECT_TIMEOUT,
    ConnectHealth,
    Retry,
    commits_alone,
    connect,
    connection_is_stale,
    observed_connection_class,
    pool_wait_verdict,
    schema_not_ready,
    sync_connection,
    translate_failure,
)
from pgqueue._enqueue import JobSpec
from pgqueue._jobs import Job, JobOptions, JobRequest, job_from_row
from pgqueue._notifications import settings_changed
from pgqueue._rows import ScheduleRow, dataclass_row
from pgqueue._schedule_rows import schedule_from_row, schedule_params
from pgqueue._schedules import Schedule, ScheduleOptions
from pgqueue._timestamps import configure_connection, register_timestamp_loaders
from pgqueue.errors import DatabaseUnavailableError, JobNotFoundError, PgQueueError, ScheduleNotFoundError

T = TypeVar("T")
Pool = ConnectionPool[psycopg.Connection[Any]]
log = logging.getLogger("pgqueue.queue")


class Queue(QueueBase[int]):
    """Enqueue and manage jobs: ``queue.enqueue("send_email", {"to": to})`` (awaited in the
    asyncio twin); the sync and the asyncio queue have the same methods.

    Nothing connects until the first call that needs the database, so a module can build its
    queue at import time. Calls that take ``conn`` run on the caller's connection, inside its
    transaction (psycopg, or SQLAlchemy's connection or session); without it they use the
    queue's own pool.
    """

    _pool: Pool | None = None
    _pool_health: ConnectHealth | None = None
    _drained_at = float("-inf")  # when the pool's connections were last retired for refusing writes
    _pool_lock = threading.Lock()  # held only to swap pools, never while connecting

    def pool(self) -> Pool:
        """The queue's own connection pool, opened on first use, and built anew after
        :meth:`close` or an outage (a closed psycopg pool cannot reopen).

        It connects in the background: a failure shows when a connection is asked for.
        """
        current = self._pool
        if current is not None and not current.closed:
            return current
        with self._pool_lock:
            if self._pool is None or self._pool.closed:
                health = ConnectHealth()
                pool: Pool = ConnectionPool(
                    self.dsn,
                    connection_class=observed_connection_class(health),
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs=self._pool_kwargs(),
                    timeout=POOL_WAIT,
                    reconnect_timeout=RECONNECT_TIMEOUT,
                    configure=configure_connection,
                    name=f"pgqueue-{self.schema}",
                    open=False,
                )
                pool.open()
                self._pool_health = health  # before the pool: whoever sees the pool sees its health
                self._pool = pool
            return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _first_pool(self) -> Pool:
        """The pool, once the server has accepted a connection of our own.

        The pool would only log why it cannot connect, and keep trying in the background; one
        direct attempt first reports a refusal at once and by name (retrying transient ones for
        ``connect_wait``), and leaves nothing behind when the server is not there.
        """
        probe = connect(
            self.dsn,
            self.connection_role,
            wait=self.connect_wait,
            prepared_statements=self.prepared_statements,
        )
        probe.close()
        return self.pool()

    def _drop_pool(self, pool: Pool) -> None:
        """Retire a pool that cannot reach the server: the next call starts again from
        :meth:`_first_pool`, and nothing keeps reconnecting for a queue nobody uses."""
        if self._pool is pool:
            self._pool = None
        # Closing joins the pool's workers, one of which may be inside a connection attempt.
        threading.Thread(target=pool.close, name=f"{pool.name}-close", daemon=True).start()

    def _after_refusal(self, pool: Pool, exc: psycopg.Error) -> bool:
        """Whether ``exc`` was the server refusing a write as read-only (nothing was written, so
        the statement may run again); if so the pool's connections are retired, at most once a
        :data:`READ_ONLY_DRAIN_INTERVAL`.

        After a switchover the pooled connections still reach the old primary, now a standby or
        fenced read-only, while the DSN (a moved address, ``target_session_attrs=read-write``)
        leads new ones to the server that takes writes. Kept, they would refuse every write until
        they expired, an hour later.
        """
        if not isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            return False
        now = time.monotonic()
        if now - self._drained_at >= READ_ONLY_DRAIN_INTERVAL:
            self._drained_at = now
            log.info("the database refused a write as read-only; reconnecting the pool")
            pool.drain()
        return True

    def _checkout(self, wait: float | None = None) -> tuple[Pool, psycopg.Connection[Any]]:
        """A live pooled connection, or the named reason there is none.

        Connections the server has already closed (a restart, ``pg_terminate_backend``) are
        dropped before anything is sent on them, so even a statement that must not run twice
        goes to a fresh one. While the pool cannot connect, a failure retrying cannot fix is
        raised at the next look (within :data:`CHECKOUT_SLICE`), a transient one after
        ``connect_wait``; a pool that is merely busy is waited on for :data:`POOL_WAIT`.
        ``wait`` bounds all of it (the admin answers 503 rather than hang a page).
        """
        pool = self._pool
        if pool is None or pool.closed:
            pool = self._first_pool()
        started = 0.0
        while True:
            try:
                conn = pool.getconn(timeout=CHECKOUT_SLICE)
            except PoolTimeout:
                now = time.monotonic()
                started = started or now - CHECKOUT_SLICE
                pool = self._after_timeout(pool, now - started)
                if wait is not None and now - started >= wait:
                    raise DatabaseUnavailableError(
                        f"no database connection within {wait:g}s (the pool of {pool.max_size} "
                        "is busy, or the server is slow to accept connections)"
                    ) from None
                continue
            except PoolClosed:  # closed by close(), or retired by another caller meanwhile
                pool = self._first_pool()
                continue
            if connection_is_stale(conn):
                conn.close()  # handed back closed, the pool replaces it
                pool.putconn(conn)
                continue
            return pool, conn

    def _after_timeout(self, pool: Pool, waited: float) -> Pool:
        current = self._pool
        health = self._pool_health
        if pool is not current or health is None:  # replaced meanwhile: go on with the new one
            return current if current is not None and not current.closed else self._first_pool()
        error, cause = pool_wait_verdict(health, waited, self.connect_wait, pool.max_size)
        if error is None:
            return pool
        if cause is not None:
            self._drop_pool(pool)
        raise error from cause

    def _run(
        self, conn: Any, work: Callable[[psycopg.Connection[Any]], T], retry: Retry
    ) -> T:
        """``work`` on the caller's connection, else on a pooled one, with failures named.

        On a pooled connection lost midway, ``work`` runs once more on a fresh one when
        ``retry`` says that is safe (see :data:`~pgqueue._connections.Retry`); with
        ``transaction`` it runs inside a transaction of its own (on an autocommit caller
        connection too, as :meth:`enqueue_many` always did).
        """
        if conn is not None:
            c = sync_connection(conn)
            try:
                if retry == "transaction" and c.autocommit:
                    with c.transaction():
                        return work(c)
                return work(c)
            except psycopg.Error as exc:
                not_ready = schema_not_ready(exc, self.schema)
                if not_ready is None:
                    raise
                raise not_ready from exc
        for attempt in (1, 2):
            pool, c = self._checkout()
            committing = False
            try:
                if retry == "transaction":
                    with c.transaction():
                        result = work(c)
                        committing = True
                    return result
                return work(c)
            except psycopg.Error as exc:
                unsure = retry == "never" or committing
                error = translate_failure(exc, c, self.schema, unsure=unsure)
                if error is None:
                    raise
                refused = self._after_refusal(pool, exc)  # refused whole: safe to repeat
                if attempt == 1 and (refused or not unsure) and isinstance(error, DatabaseUnavailableError):
                    log.debug("%s; trying once more on a new connection", error)
                    continue
                raise error from exc
            finally:
                pool.putconn(c)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        self.close()

    @contextmanager
    def connection(
        self, conn: Any = None, *, wait: float | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        """The caller's connection (its transaction) if given, else a live one from the pool
        (autocommit), waiting at most ``wait`` seconds for it.

        Failures come out named (:class:`SchemaNotReadyError`, :class:`DatabaseUnavailableError`
        for a connection lost midway…); nothing is retried, the block may not be safe to repeat.
        """
        if conn is not None:
            c = sync_connection(conn)
            try:
                yield c
            except psycopg.Error as exc:
                not_ready = schema_not_ready(exc, self.schema)
                if not_ready is None:
                    raise
                raise not_ready from exc
            return
        pool, c = self._checkout(wait)
        try:
            with c:
                yield c
        except psycopg.Error as exc:
            error = translate_failure(exc, c, self.schema, unsure=True)
            if error is None:
                raise
            self._after_refusal(pool, exc)  # the block may not be safe to repeat: only retire
            raise error from exc
        finally:
            pool.putconn(c)

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade pgqueue's schema; running it again changes nothing."""
        from pgqueue.migrate import upgrade

        upgrade(self.dsn, schema=self.schema, revision=revision)

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        conn: Any = None,
        **options: Unpack[JobOptions],
    ) -> int:
        """Insert one job and return its id (or, for a live ``unique_key``, the holder's id)."""
        request = ops.make_request(self.registry, JobSpec(task, args, **options))
        if conn is not None:
            alone = commits_alone(conn)
            return self._run(conn, lambda c: self._insert_one(c, request, alone), "never")
        # The hot path, spelled out: one checkout, one statement, no closure.
        pool, c = self._checkout()
        try:
            return self._insert_one(c, request, True)
        except psycopg.Error as exc:
            error = translate_failure(exc, c, self.schema, unsure=True)
            if error is None:
                raise
            if not self._after_refusal(pool, exc):
                raise error from exc
        finally:
            pool.putconn(c)
        # Refused as read-only, nothing written: once more, on a connection opened since.
        return self._run(None, lambda c: self._insert_one(c, request, True), "never")

    def _insert_one(
        self, c: psycopg.Connection[Any], request: JobRequest, commits_alone: bool
    ) -> int:
        params = ops.enqueue_params(self.queries, request, self.notify, commits_alone=commits_alone)
        for _ in range(UNIQUE_RACE_RETRIES):
            row = (c.execute(self.queries.enqueue, params)).fetchone()
            if row is not None:
                return int(row[0])
            found = (c.execute(self.queries.find_unique, params)).fetchone()
            if found is not None:
                return int(found[0])
            # The holder of the key finished between the two statements: insert again.
        raise PgQueueError(f"unique key {request.unique_key!r} kept changing hands; gave up")

    def enqueue_many(
        self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, conn: Any = None
    ) -> list[int]:
        """Insert many jobs in one transaction (COPY) and return their ids in order.

        One bad job refuses the batch and nothing is written (:class:`~pgqueue._enqueue.Batch`
        says when each job is checked).
        """
        alone = commits_alone(conn)
        batch = ops.Batch(self.registry, jobs, stream=alone)
        if not batch:
            return []
        return self._run(conn, lambda c: self._insert_many(c, batch, alone), "transaction")

    def _insert_many(
        self, c: psycopg.Connection[Any], batch: ops.Batch, commits_alone: bool
    ) -> list[int]:
        cur = c.execute(self.queries.reserve_ids, {"count": len(batch)})
        now, ids = cur.fetchone()  # type: ignore[misc]
        if batch.unique:
            ids = self._insert_unique(c, batch.requests, ids, commits_alone)
        else:
            copy_jobs = self.queries.copy_jobs_due_now if batch.due_now else self.queries.copy_jobs
            try:
                with c.cursor().copy(copy_jobs) as copy:
                    for chunk in batch.copy_text(ids, now):
                        copy.write(chunk)
            except ops.Refused as refused:
                raise refused.error from refused.error.__cause__  # the job's own error, not the COPY's
        if self.notify:
            queues = ops.distinct_queues(batch.requests)
            c.execute(
                self.queries.wake_queues,
                ops.wake_params(self.queries, queues, commits_alone=commits_alone),
            )
        return list(ids)

    def _insert_unique(
        self,
        c: psycopg.Connection[Any],
        requests: list[JobRequest],
        reserved: list[int],
        commits_alone: bool,
    ) -> list[int]:
        params = ops.unique_params(requests, reserved)
        cur = c.execute(self.queries.enqueue_many_unique, params)
        inserted = {row[0] for row in cur.fetchall()}
        keyed = [r for i, r in zip(reserved, requests, strict=True) if i not in inserted]
        cur = c.execute(
            self.queries.find_unique_many,
            {"queue": [r.queue for r in keyed], "unique_key": [r.unique_key for r in keyed]},
        )
        existing = {(row[1], row[2]): int(row[0]) for row in cur.fetchall()}
        for r in keyed:  # a holder that finished meanwhile: fall back to the single path
            if (r.queue, r.unique_key) not in existing:
                existing[(r.queue, r.unique_key)] = self._insert_one(c, r, commits_alone)
        return ops.resolve_conflicts(requests, reserved, inserted, existing)

    def get_job(self, job_id: int, *, conn: Any = None) -> Job:
        """The job as stored now; dead-lettered jobs come back with state ``dead``."""

        def read(c: psycopg.Connection[Any]) -> dict[str, Any] | None:
            with c.cursor(row_factory=dict_row) as cur:
                register_timestamp_loaders(cur)  # for a caller's connection too, without changing it
                cur.execute(self.queries.get_job, {"id": job_id})
                return cur.fetchone()

        row = self._run(conn, read, "read")
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job_from_row(row)

    def cancel(self, job_id: int, *, conn: Any = None) -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop. False if already finished."""
        return self._cancel(job_id, None, None, conn) == 1

    def cancel_by_key(self, unique_key: str, *, queue: str | None = None, conn: Any = None) -> int:
        """Cancel the live job(s) holding ``unique_key``, e.g. a follow-up made moot. Returns how many."""
        return self._cancel(None, unique_key, queue, conn)

    def _cancel(self, job_id: int | None, unique_key: str | None, queue: str | None, conn: Any) -> int:
        params = {"id": job_id, "unique_key": unique_key, "queue": queue, "channel": self.queries.channel}
        return self._count(self.queries.cancel_jobs, params, conn)

    def retry_dead(self, job_id: int, *, conn: Any = None) -> bool:
        """Move one dead-lettered job back to its queue with fresh attempts (same id)."""
        return self._count(self.queries.retry_dead, self._retry_params(job_id, None), conn) == 1

    def retry_all_dead(self, queue: str | None = None, *, conn: Any = None) -> int:
        """Move every dead-lettered job (of one queue, or all) back; returns how many."""
        return self._count(self.queries.retry_dead, self._retry_params(None, queue), conn)

    def _retry_params(self, job_id: int | None, queue: str | None) -> dict[str, Any]:
        return {"id": job_id, "queue": queue, "notify": self.notify, "channel": self.queries.channel}

    def _count(self, query: str, params: dict[str, Any], conn: Any) -> int:
        """Run a statement that must not run twice; how many rows it returned (= changed)."""

        def count(c: psycopg.Connection[Any]) -> int:
            return len((c.execute(query, params)).fetchall())

        return self._run(conn, count, "never")

    def configure_queue(
        self,
        name: str,
        *,
        concurrency: int | Keep | None = KEEP,
        rate_limit: float | Keep | None = KEEP,
        keep_completed: timedelta | float | None = None,
        keep_completed_count: int | None = None,
        keep_dead: timedelta | float | None = None,
    ) -> QueueSettings:
        """Set a queue's cross-worker settings: global concurrency, rate limit (jobs/s), retention.

        Omitted settings stay as they are; ``concurrency=None`` / ``rate_limit=None`` remove a limit.
        A value that cannot apply raises :class:`InvalidQueueSettingsError` and changes nothing.
        """
        params = self._queue_settings_params(
            name,
            concurrency=concurrency,
            rate_limit=rate_limit,
            keep_completed=keep_completed,
            keep_completed_count=keep_completed_count,
            keep_dead=keep_dead,
        )
        return self._set_queue(params)

    def pause(self, name: str) -> QueueSettings:
        """Stop new claims from the queue at once; running jobs finish."""
        return self._set_queue(self._queue_settings_params(name, paused=True))

    def resume(self, name: str) -> QueueSettings:
        """Allow claims again and wake the queue's workers."""
        return self._set_queue(self._queue_settings_params(name, paused=False))

    def _set_queue(self, params: dict[str, Any]) -> QueueSettings:
        def update(c: psycopg.Connection[Any]) -> QueueSettings:
            with c.cursor(row_factory=dataclass_row(QueueSettings)) as cur:
                cur.execute(self.queries.set_queue, params)
                settings = cur.fetchone()
            assert settings is not None  # an upsert always returns its row
            # A settings change is news for every worker of the queue: told to all of them.
            queues = [settings.name, settings_changed(settings.name)]
            c.execute(
                self.queries.wake_queues, ops.wake_params(self.queries, queues, commits_alone=False)
            )
            return settings

        return self._run(None, update, "transaction")

    # ------------------------------------------------------------------ schedules at run time

    @property
    def schedule_store(self) -> ScheduleStore:
        """The ``schedules`` table through this queue's pool (what schedulers and the CLI use)."""
        return ScheduleStore(self)

    def add_schedule(
        self, name: str, task: str, args: Mapping[str, Any] | None = None, **options: Unpack[ScheduleOptions]
    ) -> Schedule:
        """Store (or replace) a schedule at run time; running schedulers pick it up within seconds."""
        schedule = Schedule(name=name, task=task, args=dict(args or {}), **options)
        self.schedule_store.upsert(schedule)
        return schedule

    def list_schedules(self) -> list[Schedule]:
        """Every stored schedule, with the next fire time the schedulers computed."""
        return self.schedule_store.list()

    def pause_schedule(self, name: str) -> None:
        """Stop firing a stored schedule (declared ones too) until :meth:`resume_schedule`."""
        self.schedule_store.set_paused(name, True)

    def resume_schedule(self, name: str) -> None:
        self.schedule_store.set_paused(name, False)

    def remove_schedule(self, name: str) -> None:
        self.schedule_store.delete(name)


class ScheduleStore:
    """The ``schedules`` table through one queue's connection pool, shared by every scheduler
    process and the CLI.

    Reads and the declared-schedules sync (one transaction of its own) run again on a fresh
    connection when the first is lost midway; single writes do not (they may have taken effect).
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.queries = queue.queries

    def sync_declared(self, schedules: Iterable[Schedule]) -> None:
        """Store the schedules declared in code; forget code schedules no longer declared."""
        schedules = list(schedules)

        def store(c: psycopg.Connection[Any]) -> None:
            for schedule in schedules:
                c.execute(self.queries.upsert_schedule, schedule_params(schedule, from_code=True))
            c.execute(self.queries.delete_stale_code_schedules, {"names": [s.name for s in schedules]})

        self.queue._run(None, store, "transaction")

    def upsert(self, schedule: Schedule) -> bool:
        """Add or replace a run-time schedule; True when it is new."""

        def upsert(c: psycopg.Connection[Any]) -> bool:
            cur = c.execute(self.queries.upsert_schedule, schedule_params(schedule, from_code=False))
            row = cur.fetchone()
            return bool(row and row[0])

        return self.queue._run(None, upsert, "never")

    def list(self) -> list[Schedule]:
        def read(c: psycopg.Connection[Any]) -> list[ScheduleRow]:
            with c.cursor(row_factory=dataclass_row(ScheduleRow)) as cur:
                cur.execute(self.queries.list_schedules)
                return cur.fetchall()

        return [schedule_from_row(row) for row in self.queue._run(None, read, "read")]

    def get(self, name: str) -> Schedule:
        for schedule in self.list():
            if schedule.name == name:
                return schedule
        raise ScheduleNotFoundError(f"no schedule named {name!r}")

    def set_paused(self, name: str, paused: bool) -> None:
        self._change(self.queries.set_schedule_paused, {"name": name, "paused": paused})

    def delete(self, name: str) -> None:
        self._change(self.queries.delete_schedule, {"name": name})

    def set_next_fire(self, name: str, next_fire_at: datetime | None) -> None:
        def write(c: psycopg.Connection[Any]) -> None:
            c.execute(self.queries.set_next_fire, {"name": name, "next_fire_at": next_fire_at})

        self.queue._run(None, write, "never")

    def fire(
        self, name: str, fire_at: datetime, next_fire_at: datetime | None, unique_key: str
    ) -> int | None:
        """Enqueue the job of one fire time, in the transaction that claims it, unless another
        scheduler already did (or the schedule is paused): the job's id, else None."""
        with self.queue.connection() as c, c.transaction():
            cur = c.execute(
                self.queries.claim_fire, {"name": name, "fire_at": fire_at, "next_fire_at": next_fire_at}
            )
            row = cur.fetchone()
            if row is None:
                return None
            task, args, queue, priority, max_attempts = row
            spec = JobSpec(
                task,
                args,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                unique_key=unique_key,
                scheduled_for=fire_at,
            )
            # Committed right after, by _run: one waiting worker is woken.
            return self.queue._insert_one(c, ops.make_request(self.queue.registry, spec), True)

    def _change(self, query: str, params: dict[str, Any]) -> None:
        if self.queue._count(query, params, None) == 0:
            raise ScheduleNotFoundError(f"no schedule named {params['name']!r}")
