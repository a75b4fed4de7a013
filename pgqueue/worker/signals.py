"""The worker's stop signals, kept in place against the job code that runs beside them.

An async handler runs on the worker's main thread, where ``signal.signal`` works: a library that
sets ``SIG_IGN`` for SIGTERM (or its own handler, or ``SIG_DFL``) would leave the worker deaf to
systemd's stop, or killed by it mid-job, until the unit's stop timeout sends SIGKILL and every
running job waits out its lease. So the worker checks after jobs end and every
:data:`GUARD_INTERVAL` seconds that its handlers are still the ones it installed, puts them back
if not, and names the jobs that may have done it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pgqueue.worker")

# SIGHUP too: a worker started from a shell that goes away (an ssh session closed) would otherwise
# die mid-job, its running jobs left to wait out their leases.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GUARD_INTERVAL = 0.5  # seconds between checks while jobs run (a job can run for hours)
# After-job checks at most this often: a check costs ~7 µs (signal.getsignal builds an enum), and
# a drain ends tens of thousands of jobs a second.
AFTER_JOBS_EVERY = 0.01


class StopSignals:
    """The stop signals routed to ``on_signal`` on ``loop``, restored when job code replaces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_signal = on_signal
        self._installed: dict[signal.Signals, Any] = {}
        self._checked_after_job = float("-inf")

    def install(self) -> bool:
        """Route the stop signals to the loop; False where that cannot be done (not the main thread)."""
        try:
            for sig in STOP_SIGNALS:
                self._add(sig)
        except (RuntimeError, ValueError):
            self._installed.clear()
            return False
        return True

    def remove(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    def after_job(self, job: Callable[[], str]) -> None:
        """A job ended: check, unless another ending job did within AFTER_JOBS_EVERY."""
        now = time.monotonic()
        if now - self._checked_after_job >= AFTER_JOBS_EVERY:
            self._checked_after_job = now
            self.restore_if_replaced(lambda: f"noticed after {job()} ended")

    async def guard(self, running: Callable[[], str]) -> None:
        """Check every GUARD_INTERVAL seconds, for jobs that replace a handler and run on."""
        while True:
            await asyncio.sleep(GUARD_INTERVAL)
            self.restore_if_replaced(lambda: f"noticed while running {running()}")

    def restore_if_replaced(self, noticed: Callable[[], str]) -> None:
        """Put back any stop signal handler that is no longer ours, saying when that was seen."""
        for sig, ours in self._installed.items():
            if signal.getsignal(sig) is ours:
                continue
            log.warning(
                "the worker's %s handler was replaced (%s); restored, so a stop request still "
                "stops the worker gracefully",
                sig.name,
                noticed(),
            )
            self._add(sig)  # replaces the value of an existing key: the iteration goes on

    def _add(self, sig: signal.Signals) -> None:
        self._loop.add_signal_handler(sig, self._on_signal, sig)
        self._installed[sig] = signal.getsignal(sig)
