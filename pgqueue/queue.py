"""The synchronous queue: what a (threaded) app uses to enqueue, inspect and cancel jobs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from typing_extensions import Unpack

from pgqueue import enqueue as ops
from pgqueue.base import KEEP, UNIQUE_RACE_RETRIES, Keep, QueueBase, QueueSettings
from pgqueue.connections import sync_connection
from pgqueue.enqueue import JobSpec
from pgqueue.errors import DatabaseUnavailableError, JobNotFoundError, PgQueueError
from pgqueue.jobs import Job, JobRequest, job_from_row
from pgqueue.notifications import settings_changed
from pgqueue.schedule_store import ScheduleStore
from pgqueue.schedules import Schedule, ScheduleOptions


class Queue(QueueBase[int]):
    """Enqueue and manage jobs from synchronous code.

    >>> queue = Queue("postgresql://localhost/app")
    >>> @queue.task(queue="email", max_attempts=5)
    ... def send_email(to: str) -> None: ...
    >>> send_email.enqueue(to="a@b.c")  # doctest: +SKIP
    """

    _pool: ConnectionPool[psycopg.Connection[Any]] | None = None
    _pool_lock = threading.Lock()

    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """The queue's own connection pool, opened on first use."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs={"autocommit": True},
                    name=f"pgqueue-{self.schema}",
                    open=True,
                )
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        self.close()

    @contextmanager
    def connection(self, conn: Any = None) -> Iterator[psycopg.Connection[Any]]:
        """The caller's connection (its transaction) if given, else one from the pool (autocommit)."""
        if conn is not None:
            yield sync_connection(conn)
        else:
            try:
                with self.pool().connection() as pooled:
                    yield pooled
            except PoolTimeout as exc:
                raise DatabaseUnavailableError(f"cannot connect to the database: {exc}") from exc

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
        with self.connection(conn) as c:
            return self._insert_one(c, request)

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
        with self.connection(conn) as c, c.transaction() if c.autocommit else nullcontext():
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
        with self.connection(conn) as c, c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self.queries.get_job, {"id": job_id}).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job_from_row(row)

    def cancel(self, job_id: int, *, conn: Any = None) -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop. False if already finished."""
        with self.connection(conn) as c:
            return (
                c.execute(self.queries.cancel, {"id": job_id, "channel": self.queries.channel}).fetchone()
                is not None
            )

    def cancel_by_key(self, unique_key: str, *, queue: str | None = None, conn: Any = None) -> int:
        """Cancel the live job(s) holding ``unique_key``, e.g. a follow-up made moot. Returns how many."""
        with self.connection(conn) as c:
            return len(
                c.execute(
                    self.queries.cancel_by_key,
                    {"unique_key": unique_key, "queue": queue, "channel": self.queries.channel},
                ).fetchall()
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
        with self.connection(conn) as c:
            return len(c.execute(self.queries.retry_dead, params).fetchall())

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
        with self.connection() as c, c.transaction():
            row = c.execute(self.queries.set_queue, params).fetchone()
            assert row is not None
            c.execute(
                self.queries.wake_queues,
                {"channel": self.queries.channel, "queues": [row[0], settings_changed(row[0])]},
            )
        return QueueSettings(*row)

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
