"""The worker's stop signals, kept in place against the job code that runs beside them.

An async handler runs on the worker's main thread, where ``signal.signal`` works: a library that
sets ``SIG_IGN`` for SIGTERM (or its own handler, or ``SIG_DFL``) would leave the worker deaf to
systemd's stop, or killed by it mid-job, until the unit's stop timeout sends SIGKILL and every
running job waits out its lease. So the worker checks after each job and every
:data:`GUARD_INTERVAL` seconds that its handlers are still the ones it installed, puts them back
if not, and names the jobs that were running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pgqueue.worker")

# SIGHUP too: a worker started from a shell that goes away (an ssh session closed) would otherwise
# die mid-job, its running jobs left to wait out their leases.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GUARD_INTERVAL = 0.5  # seconds between checks while jobs run (a job can run for hours)


class StopSignals:
    """The stop signals routed to ``on_signal`` on ``loop``, restored when job code replaces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_signal = on_signal
        self._installed: dict[signal.Signals, Any] = {}

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

    def restore_if_replaced(self, culprit: Callable[[], str]) -> None:
        """Put back any stop signal handler that is no longer ours, saying who ran meanwhile."""
        for sig, ours in list(self._installed.items()):
            if signal.getsignal(sig) is ours:
                continue
            log.warning(
                "the worker's %s handler was replaced (by %s); restored, so a stop request still "
                "stops the worker gracefully",
                sig.name,
                culprit(),
            )
            self._add(sig)

    async def guard(self, culprit: Callable[[], str]) -> None:
        """Check every GUARD_INTERVAL seconds, for jobs that replace a handler and run on."""
        while True:
            await asyncio.sleep(GUARD_INTERVAL)
            self.restore_if_replaced(culprit)

    def _add(self, sig: signal.Signals) -> None:
        self._loop.add_signal_handler(sig, self._on_signal, sig)
        self._installed[sig] = signal.getsignal(sig)
