"""The synchronous queue: what a (threaded) app uses to enqueue, inspect and cancel jobs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from typing_extensions import Unpack

from pgqueue import enqueue as ops
from pgqueue._timestamps import configure_connection, register_timestamp_loaders
from pgqueue.base import KEEP, UNIQUE_RACE_RETRIES, Keep, QueueBase, QueueSettings
from pgqueue.connections import (
    CHECKOUT_SLICE,
    POOL_WAIT,
    RECONNECT_TIMEOUT,
    ConnectHealth,
    Retry,
    connect,
    connection_is_stale,
    observed_connection_class,
    pool_wait_verdict,
    schema_not_ready,
    sync_connection,
    translate_failure,
)
from pgqueue.enqueue import JobSpec
from pgqueue.errors import DatabaseUnavailableError, JobNotFoundError, PgQueueError
from pgqueue.jobs import Job, JobRequest, job_from_row
from pgqueue.notifications import settings_changed
from pgqueue.schedule_store import ScheduleStore
from pgqueue.schedules import Schedule, ScheduleOptions

T = TypeVar("T")
Pool = ConnectionPool[psycopg.Connection[Any]]
log = logging.getLogger("pgqueue.queue")


class Queue(QueueBase[int]):
    """Enqueue and manage jobs from synchronous code.

    >>> queue = Queue("postgresql://localhost/app")
    >>> @queue.task(queue="email", max_attempts=5)
    ... def send_email(to: str) -> None: ...
    >>> send_email.enqueue(to="a@b.c")  # doctest: +SKIP
    """

    _pool: Pool | None = None
    _pool_health: ConnectHealth | None = None
    _pool_lock = threading.Lock()  # held only to swap pools, never while connecting

    def pool(self) -> Pool:
        """The queue's own connection pool, opened on first use, and built anew after
        :meth:`close` or an outage (a closed psycopg pool cannot reopen).

        It connects in the background: a failure shows when a connection is asked for.
        """
        pool = self._pool
        if pool is not None and not pool.closed:
            return pool
        with self._pool_lock:
            if self._pool is None or self._pool.closed:
                health = ConnectHealth()
                self._pool_health = health  # before the pool: whoever sees the pool sees its health
                self._pool = ConnectionPool(
                    self.dsn,
                    connection_class=observed_connection_class(health),
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs=self._pool_kwargs(),
                    configure=configure_connection,
                    name=f"pgqueue-{self.schema}",
                    timeout=POOL_WAIT,
                    reconnect_timeout=RECONNECT_TIMEOUT,
                    open=True,
                )
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _first_pool(self) -> Pool:
        """The pool, once the server has accepted a connection of our own.

        The pool would only log why it cannot connect, and keep trying in the background; one
        direct attempt first reports a refusal at once and by name (retrying transient ones for
        ``connect_wait``), and leaves nothing behind when the server is not there.
        """
        connect(
            self.dsn,
            self.connection_role,
            wait=self.connect_wait,
            prepared_statements=self.prepared_statements,
        ).close()
        return self.pool()

    def _drop_pool(self, pool: Pool) -> None:
        """Retire a pool that cannot reach the server: the next call starts again from
        :meth:`_first_pool`, and nothing keeps reconnecting for a queue nobody uses."""
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        # Closing joins the pool's threads, one of which may be inside a connection attempt.
        threading.Thread(target=pool.close, name=f"{pool.name}-close", daemon=True).start()

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

    def _run(self, conn: Any, work: Callable[[psycopg.Connection[Any]], T], retry: Retry) -> T:
        """``work`` on the caller's connection, else on a pooled one, with failures named.

        On a pooled connection lost midway, ``work`` runs once more on a fresh one when
        ``retry`` says that is safe (see :data:`~pgqueue.connections.Retry`); with
        ``transaction`` it runs inside a transaction of its own (on an autocommit caller
        connection too, as :meth:`enqueue_many` always did).
        """
        if conn is not None:
            c = sync_connection(conn)
            try:
                if retry == "transaction":
                    with c.transaction() if c.autocommit else nullcontext():
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
                if attempt == 1 and not unsure and isinstance(error, DatabaseUnavailableError):
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
    def connection(self, conn: Any = None, *, wait: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """The caller's connection (its transaction) if given, else a live one from the pool
        (autocommit).

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
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        unique_key: str | None = None,
        conn: Any = None,
    ) -> int:
        """Insert one job and return its id (or, for a live ``unique_key``, the holder's id)."""
        request = self._request(
            task,
            args,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            unique_key=unique_key,
        )
        if conn is not None:
            return self._run(conn, lambda c: self._insert_one(c, request), "never")
        # The hot path, spelled out: one checkout, one statement, no closure.
        pool, c = self._checkout()
        try:
            return self._insert_one(c, request)
        except psycopg.Error as exc:
            error = translate_failure(exc, c, self.schema, unsure=True)
            if error is None:
                raise
            raise error from exc
        finally:
            pool.putconn(c)

    def _insert_one(self, c: psycopg.Connection[Any], request: JobRequest) -> int:
        params = ops.enqueue_params(self.queries, request, self.notify)
        for _ in range(UNIQUE_RACE_RETRIES):
            row = c.execute(self.queries.enqueue, params).fetchone()
            if row is not None:
                return int(row[0])
            found = c.execute(self.queries.find_unique, params).fetchone()
            if found is not None:
                return int(found[0])
            # The holder of the key finished between the two statements: insert again.
        raise PgQueueError(f"unique key {request.unique_key!r} kept changing hands; gave up")

    def enqueue_many(self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, conn: Any = None) -> list[int]:
        """Insert many jobs in one transaction (COPY) and return their ids in order.

        Every job is validated first: one bad job refuses the batch and nothing is written.
        """
        requests = ops.make_requests(self.registry, jobs)
        if not requests:
            return []
        return self._run(conn, lambda c: self._insert_many(c, requests), "transaction")

    def _insert_many(self, c: psycopg.Connection[Any], requests: list[JobRequest]) -> list[int]:
        now, ids = c.execute(self.queries.reserve_ids, {"count": len(requests)}).fetchone()  # type: ignore[misc]
        if any(r.unique_key is not None for r in requests):
            ids = self._insert_unique(c, requests, ids)
        else:
            with c.cursor().copy(self.queries.copy_jobs) as copy:
                for chunk in ops.copy_chunks(requests, ids, now):
                    copy.write(chunk)
        if self.notify:
            c.execute(
                self.queries.notify_queues,
                {"channel": self.queries.channel, "queues": ops.distinct_queues(requests)},
            )
        return list(ids)

    def _insert_unique(
        self, c: psycopg.Connection[Any], requests: list[JobRequest], reserved: list[int]
    ) -> list[int]:
        params = ops.unique_params(requests, reserved)
        inserted = {row[0] for row in c.execute(self.queries.enqueue_many_unique, params)}
        keyed = [r for i, r in zip(reserved, requests, strict=True) if i not in inserted]
        existing = {
            (row[1], row[2]): int(row[0])
            for row in c.execute(
                self.queries.find_unique_many,
                {"queue": [r.queue for r in keyed], "unique_key": [r.unique_key for r in keyed]},
            )
        }
        for r in keyed:  # a holder that finished meanwhile: fall back to the single path
            if (r.queue, r.unique_key) not in existing:
                existing[(r.queue, r.unique_key)] = self._insert_one(c, r)
        return ops.resolve_conflicts(requests, reserved, inserted, existing)

    def get_job(self, job_id: int, *, conn: Any = None) -> Job:
        """The job as stored now; dead-lettered jobs come back with state ``dead``."""

        def read(c: psycopg.Connection[Any]) -> dict[str, Any] | None:
            with c.cursor(row_factory=dict_row) as cur:
                register_timestamp_loaders(cur)  # for a caller's connection too, without changing it
                return cur.execute(self.queries.get_job, {"id": job_id}).fetchone()

        row = self._run(conn, read, "read")
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job_from_row(row)

    def cancel(self, job_id: int, *, conn: Any = None) -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop. False if already finished."""
        params = {"id": job_id, "channel": self.queries.channel}
        return (
            self._run(conn, lambda c: c.execute(self.queries.cancel, params).fetchone(), "never") is not None
        )

    def cancel_by_key(self, unique_key: str, *, queue: str | None = None, conn: Any = None) -> int:
        """Cancel the live job(s) holding ``unique_key``, e.g. a follow-up made moot. Returns how many."""
        params = {"unique_key": unique_key, "queue": queue, "channel": self.queries.channel}
        return len(
            self._run(conn, lambda c: c.execute(self.queries.cancel_by_key, params).fetchall(), "never")
        )

    def retry_dead(self, job_id: int, *, conn: Any = None) -> bool:
        """Move one dead-lettered job back to its queue with fresh attempts (same id)."""
        return self._retry_dead(job_id, None, conn) == 1

    def retry_all_dead(self, queue: str | None = None, *, conn: Any = None) -> int:
        """Move every dead-lettered job (of one queue, or all) back; returns how many."""
        return self._retry_dead(None, queue, conn)

    def _retry_dead(self, job_id: int | None, queue: str | None, conn: Any) -> int:
        params = {
            "id": job_id,
            "queue": queue,
            "notify": self.notify,
            "channel": self.queries.channel,
        }
        return len(self._run(conn, lambda c: c.execute(self.queries.retry_dead, params).fetchall(), "never"))

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
        def update(c: psycopg.Connection[Any]) -> tuple[Any, ...]:
            row = c.execute(self.queries.set_queue, params).fetchone()
            assert row is not None
            c.execute(
                self.queries.wake_queues,
                {"channel": self.queries.channel, "queues": [row[0], settings_changed(row[0])]},
            )
            return tuple(row)

        return QueueSettings(*self._run(None, update, "transaction"))

    # ------------------------------------------------------------------ schedules at run time

    def add_schedule(
        self, name: str, task: str, args: Mapping[str, Any] | None = None, **options: Unpack[ScheduleOptions]
    ) -> Schedule:
        """Store (or replace) a schedule at run time; running schedulers pick it up within seconds."""
        schedule = Schedule(name=name, task=task, args=dict(args or {}), **options)
        ScheduleStore(self).upsert(schedule)
        return schedule

    def list_schedules(self) -> list[Schedule]:
        """Every stored schedule, with the next fire time the schedulers computed."""
        return ScheduleStore(self).list()

    def pause_schedule(self, name: str) -> None:
        ScheduleStore(self).set_paused(name, True)

    def resume_schedule(self, name: str) -> None:
        ScheduleStore(self).set_paused(name, False)

    def remove_schedule(self, name: str) -> None:
        ScheduleStore(self).delete(name)
