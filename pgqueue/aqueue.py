"""The asynchronous twin of :class:`pgqueue.Queue`: same methods, awaited."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout
from typing_extensions import Unpack

from pgqueue import enqueue as ops
from pgqueue._timestamps import configure_async_connection, register_timestamp_loaders
from pgqueue.base import KEEP, UNIQUE_RACE_RETRIES, Keep, QueueBase, QueueSettings
from pgqueue.connections import (
    CHECKOUT_SLICE,
    POOL_WAIT,
    RECONNECT_TIMEOUT,
    ConnectHealth,
    Retry,
    async_connection,
    connect_async,
    connection_is_stale,
    observed_async_connection_class,
    pool_wait_verdict,
    schema_not_ready,
    translate_failure,
)
from pgqueue.enqueue import JobSpec
from pgqueue.errors import DatabaseUnavailableError, JobNotFoundError, PgQueueError
from pgqueue.jobs import Job, JobRequest, job_from_row
from pgqueue.notifications import settings_changed
from pgqueue.schedule_store import ScheduleNotFoundError, schedule_from_row, schedule_params
from pgqueue.schedules import Schedule, ScheduleOptions

T = TypeVar("T")
AsyncPool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]
log = logging.getLogger("pgqueue.queue")
# Pools retired after an outage, closing in the background (a task nobody holds may be collected).
_closing: set[asyncio.Task[None]] = set()


class AsyncQueue(QueueBase[Awaitable[int]]):
    """Enqueue and manage jobs from asyncio code (``await queue.enqueue(...)``)."""

    _pool: AsyncPool | None = None
    _pool_health: ConnectHealth | None = None
    _pool_lock: asyncio.Lock | None = None

    async def pool(self) -> AsyncPool:
        """The queue's own connection pool, opened on first use, and built anew after
        :meth:`close` or an outage (a closed psycopg pool cannot reopen)."""
        current = self._pool
        if current is not None and not current.closed:
            return current
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None or self._pool.closed:
                health = ConnectHealth()
                pool: AsyncPool = AsyncConnectionPool(
                    self.dsn,
                    connection_class=observed_async_connection_class(health),
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs=self._pool_kwargs(),
                    timeout=POOL_WAIT,
                    reconnect_timeout=RECONNECT_TIMEOUT,
                    configure=configure_async_connection,
                    name=f"pgqueue-async-{self.schema}",
                    open=False,
                )
                await pool.open()
                self._pool_health = health  # before the pool: whoever sees the pool sees its health
                self._pool = pool
            return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _first_pool(self) -> AsyncPool:
        """The pool, once the server has accepted a connection of our own (see
        :meth:`Queue._first_pool`: failures named at once, nothing left retrying)."""
        probe = await connect_async(
            self.dsn,
            self.connection_role,
            wait=self.connect_wait,
            prepared_statements=self.prepared_statements,
        )
        await probe.close()
        return await self.pool()

    def _drop_pool(self, pool: AsyncPool) -> None:
        """Retire a pool that cannot reach the server; the next call starts from :meth:`_first_pool`."""
        if self._pool is pool:
            self._pool = None
        task = asyncio.get_running_loop().create_task(pool.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _checkout(self) -> tuple[AsyncPool, psycopg.AsyncConnection[Any]]:
        """A live pooled connection, or the named reason there is none (see :meth:`Queue._checkout`)."""
        pool = self._pool
        if pool is None or pool.closed:
            pool = await self._first_pool()
        started = 0.0
        while True:
            try:
                conn = await pool.getconn(timeout=CHECKOUT_SLICE)
            except PoolTimeout:
                now = time.monotonic()
                started = started or now - CHECKOUT_SLICE
                pool = await self._after_timeout(pool, now - started)
                continue
            except PoolClosed:
                pool = await self._first_pool()
                continue
            if connection_is_stale(conn):
                await conn.close()
                await pool.putconn(conn)
                continue
            return pool, conn

    async def _after_timeout(self, pool: AsyncPool, waited: float) -> AsyncPool:
        current = self._pool
        health = self._pool_health
        if pool is not current or health is None:  # replaced meanwhile: go on with the new one
            return current if current is not None and not current.closed else await self._first_pool()
        error, cause = pool_wait_verdict(health, waited, self.connect_wait, pool.max_size)
        if error is None:
            return pool
        if cause is not None:
            self._drop_pool(pool)
        raise error from cause

    async def _run(
        self, conn: Any, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], retry: Retry
    ) -> T:
        """``work`` on the caller's connection, else on a pooled one (see :meth:`Queue._run`)."""
        if conn is not None:
            c = await async_connection(conn)
            try:
                if retry == "transaction" and c.autocommit:
                    async with c.transaction():
                        return await work(c)
                return await work(c)
            except psycopg.Error as exc:
                not_ready = schema_not_ready(exc, self.schema)
                if not_ready is None:
                    raise
                raise not_ready from exc
        for attempt in (1, 2):
            pool, c = await self._checkout()
            committing = False
            try:
                if retry == "transaction":
                    async with c.transaction():
                        result = await work(c)
                        committing = True
                    return result
                return await work(c)
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
                await pool.putconn(c)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        await self.close()

    @asynccontextmanager
    async def connection(self, conn: Any = None) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The caller's connection (its transaction) if given, else a live one from the pool
        (autocommit); failures come out named, nothing is retried (see :meth:`Queue.connection`)."""
        if conn is not None:
            c = await async_connection(conn)
            try:
                yield c
            except psycopg.Error as exc:
                not_ready = schema_not_ready(exc, self.schema)
                if not_ready is None:
                    raise
                raise not_ready from exc
            return
        pool, c = await self._checkout()
        try:
            async with c:
                yield c
        except psycopg.Error as exc:
            error = translate_failure(exc, c, self.schema, unsure=True)
            if error is None:
                raise
            raise error from exc
        finally:
            await pool.putconn(c)

    async def migrate(self, revision: str = "head") -> None:
        """Create or upgrade pgqueue's schema (in a thread: Alembic is synchronous)."""
        from pgqueue.migrate import upgrade

        await asyncio.to_thread(upgrade, self.dsn, schema=self.schema, revision=revision)

    async def enqueue(
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
            return await self._run(conn, lambda c: self._insert_one(c, request), "never")
        # The hot path, spelled out: one checkout, one statement, no closure.
        pool, c = await self._checkout()
        try:
            return await self._insert_one(c, request)
        except psycopg.Error as exc:
            error = translate_failure(exc, c, self.schema, unsure=True)
            if error is None:
                raise
            raise error from exc
        finally:
            await pool.putconn(c)

    async def _insert_one(self, c: psycopg.AsyncConnection[Any], request: JobRequest) -> int:
        params = ops.enqueue_params(self.queries, request, self.notify)
        for _ in range(UNIQUE_RACE_RETRIES):
            row = await (await c.execute(self.queries.enqueue, params)).fetchone()
            if row is not None:
                return int(row[0])
            found = await (await c.execute(self.queries.find_unique, params)).fetchone()
            if found is not None:
                return int(found[0])
        raise PgQueueError(f"unique key {request.unique_key!r} kept changing hands; gave up")

    async def enqueue_many(
        self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, conn: Any = None
    ) -> list[int]:
        """Insert many jobs in one transaction (COPY) and return their ids in order."""
        requests = ops.make_requests(self.registry, jobs)
        if not requests:
            return []
        return await self._run(conn, lambda c: self._insert_many(c, requests), "transaction")

    async def _insert_many(self, c: psycopg.AsyncConnection[Any], requests: list[JobRequest]) -> list[int]:
        cur = await c.execute(self.queries.reserve_ids, {"count": len(requests)})
        now, ids = await cur.fetchone()  # type: ignore[misc]
        if any(r.unique_key is not None for r in requests):
            ids = await self._insert_unique(c, requests, ids)
        else:
            async with c.cursor().copy(self.queries.copy_jobs) as copy:
                for chunk in ops.copy_chunks(requests, ids, now):
                    await copy.write(chunk)
        if self.notify:
            await c.execute(
                self.queries.notify_queues,
                {"channel": self.queries.channel, "queues": ops.distinct_queues(requests)},
            )
        return list(ids)

    async def _insert_unique(
        self, c: psycopg.AsyncConnection[Any], requests: list[JobRequest], reserved: list[int]
    ) -> list[int]:
        params = ops.unique_params(requests, reserved)
        cur = await c.execute(self.queries.enqueue_many_unique, params)
        inserted = {row[0] for row in await cur.fetchall()}
        keyed = [r for i, r in zip(reserved, requests, strict=True) if i not in inserted]
        cur = await c.execute(
            self.queries.find_unique_many,
            {"queue": [r.queue for r in keyed], "unique_key": [r.unique_key for r in keyed]},
        )
        existing = {(row[1], row[2]): int(row[0]) for row in await cur.fetchall()}
        for r in keyed:
            if (r.queue, r.unique_key) not in existing:
                existing[(r.queue, r.unique_key)] = await self._insert_one(c, r)
        return ops.resolve_conflicts(requests, reserved, inserted, existing)

    async def get_job(self, job_id: int, *, conn: Any = None) -> Job:
        """The job as stored now; dead-lettered jobs come back with state ``dead``."""

        async def read(c: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
            async with c.cursor(row_factory=dict_row) as cur:
                register_timestamp_loaders(cur)  # for a caller's connection too, without changing it
                await cur.execute(self.queries.get_job, {"id": job_id})
                return await cur.fetchone()

        row = await self._run(conn, read, "read")
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job_from_row(row)

    async def cancel(self, job_id: int, *, conn: Any = None) -> bool:
        """Cancel a queued job or ask a running one to stop. False if it had already finished."""
        return (
            await self._count(self.queries.cancel, {"id": job_id, "channel": self.queries.channel}, conn) == 1
        )

    async def cancel_by_key(self, unique_key: str, *, queue: str | None = None, conn: Any = None) -> int:
        """Cancel the live job(s) holding ``unique_key``. Returns how many."""
        return await self._count(
            self.queries.cancel_by_key,
            {"unique_key": unique_key, "queue": queue, "channel": self.queries.channel},
            conn,
        )

    async def retry_dead(self, job_id: int, *, conn: Any = None) -> bool:
        """Move one dead-lettered job back to its queue with fresh attempts (same id)."""
        return await self._count(self.queries.retry_dead, self._retry_params(job_id, None), conn) == 1

    async def retry_all_dead(self, queue: str | None = None, *, conn: Any = None) -> int:
        """Move every dead-lettered job (of one queue, or all) back; returns how many."""
        return await self._count(self.queries.retry_dead, self._retry_params(None, queue), conn)

    def _retry_params(self, job_id: int | None, queue: str | None) -> dict[str, Any]:
        return {
            "id": job_id,
            "queue": queue,
            "notify": self.notify,
            "channel": self.queries.channel,
        }

    async def _count(self, query: str, params: dict[str, Any], conn: Any) -> int:
        async def count(c: psycopg.AsyncConnection[Any]) -> int:
            return len(await (await c.execute(query, params)).fetchall())

        return await self._run(conn, count, "never")

    async def configure_queue(
        self,
        name: str,
        *,
        concurrency: int | Keep | None = KEEP,
        rate_limit: float | Keep | None = KEEP,
        keep_completed: timedelta | float | None = None,
        keep_completed_count: int | None = None,
        keep_dead: timedelta | float | None = None,
    ) -> QueueSettings:
        """Set a queue's cross-worker settings (see :meth:`Queue.configure_queue`)."""
        params = self._queue_settings_params(
            name,
            concurrency=concurrency,
            rate_limit=rate_limit,
            keep_completed=keep_completed,
            keep_completed_count=keep_completed_count,
            keep_dead=keep_dead,
        )
        return await self._set_queue(params)

    async def pause(self, name: str) -> QueueSettings:
        """Stop new claims from the queue at once; running jobs finish."""
        return await self._set_queue(self._queue_settings_params(name, paused=True))

    async def resume(self, name: str) -> QueueSettings:
        """Allow claims again and wake the queue's workers."""
        return await self._set_queue(self._queue_settings_params(name, paused=False))

    async def _set_queue(self, params: dict[str, Any]) -> QueueSettings:
        async def update(c: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
            row = await (await c.execute(self.queries.set_queue, params)).fetchone()
            assert row is not None
            await c.execute(
                self.queries.wake_queues,
                {"channel": self.queries.channel, "queues": [row[0], settings_changed(row[0])]},
            )
            return tuple(row)

        return QueueSettings(*await self._run(None, update, "transaction"))

    # ------------------------------------------------------------------ schedules at run time

    async def add_schedule(
        self, name: str, task: str, args: Mapping[str, Any] | None = None, **options: Unpack[ScheduleOptions]
    ) -> Schedule:
        """Store (or replace) a schedule at run time; running schedulers pick it up within seconds."""
        schedule = Schedule(name=name, task=task, args=dict(args or {}), **options)
        await self._count(self.queries.upsert_schedule, schedule_params(schedule, from_code=False), None)
        return schedule

    async def list_schedules(self) -> list[Schedule]:
        """Every stored schedule, with the next fire time the schedulers computed."""

        async def read(c: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await c.execute(self.queries.list_schedules)).fetchall()

        return [schedule_from_row(row) for row in await self._run(None, read, "read")]

    async def pause_schedule(self, name: str) -> None:
        await self._change_schedule(self.queries.set_schedule_paused, {"name": name, "paused": True})

    async def resume_schedule(self, name: str) -> None:
        await self._change_schedule(self.queries.set_schedule_paused, {"name": name, "paused": False})

    async def remove_schedule(self, name: str) -> None:
        await self._change_schedule(self.queries.delete_schedule, {"name": name})

    async def _change_schedule(self, query: str, params: dict[str, Any]) -> None:
        if await self._count(query, params, None) == 0:
            raise ScheduleNotFoundError(f"no schedule named {params['name']!r}")
