"""One process that runs a worker and what runs beside it: the scheduler, the dev dashboard.

``pgqueue worker --with-scheduler`` and ``pgqueue dev`` both compose their processes here, so
they start and stop the same way: the scheduler first (its threads), then the services, then the
worker; once the worker returns (SIGTERM, :meth:`Supervisor.stop`) or a service fails, the
services are stopped, then the scheduler, each after the jobs in hand are finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler extra is optional: only its type is named here
    from pgqueue.scheduler import Scheduler
    from pgqueue.worker.core import AsyncWorker

log = logging.getLogger("pgqueue.worker")


@dataclass(frozen=True)
class Service:
    """Something that runs beside the worker until asked to stop (a web server, a feeder)."""

    name: str
    run: Callable[[], Awaitable[None]]
    stop: Callable[[], None]


class Supervisor:
    """Runs ``worker`` with an optional ``scheduler`` and ``services`` until the worker stops."""

    def __init__(
        self, worker: AsyncWorker, *, scheduler: Scheduler | None = None, services: Sequence[Service] = ()
    ) -> None:
        self.worker = worker
        self.scheduler = scheduler
        self.services = tuple(services)

    def stop(self) -> None:
        """Finish the jobs in hand and stop everything (what SIGTERM does); safe from any thread."""
        self.worker.stop()

    async def run(self) -> None:
        """Until the worker returns; a service that fails stops the worker and is raised."""
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.start)
        running: dict[asyncio.Task[None], Service] = {}
        try:
            for service in self.services:
                running[asyncio.ensure_future(service.run())] = service
            worker = asyncio.ensure_future(self.worker.run())
            done, _ = await asyncio.wait([worker, *running], return_when=asyncio.FIRST_COMPLETED)
            failed = next((t for t in done if t is not worker and not t.cancelled() and t.exception()), None)
            if failed is not None:
                log.error("%s stopped: %s; stopping the worker", running[failed].name, failed.exception())
            if not worker.done():
                self.worker.stop()
            await worker
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
        finally:
            for service in running.values():
                service.stop()
            await asyncio.gather(*running, return_exceptions=True)
            if self.scheduler is not None:
                await asyncio.to_thread(self.scheduler.shutdown)
