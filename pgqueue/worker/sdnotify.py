"""The systemd notify protocol (``sd_notify``), with nothing but the standard library.

A unit with ``Type=notify`` hands its main process a datagram socket in ``$NOTIFY_SOCKET``; the
process reports its life cycle by sending newline-separated ``KEY=VALUE`` assignments to it:

- ``READY=1`` once the worker is connected and claiming, so ``systemctl start`` (and units
  ordered after this one) wait for a worker that really works, not just for a started process;
- ``STOPPING=1`` when a shutdown signal arrives, so ``systemctl status`` shows "deactivating"
  while running jobs finish within the grace period;
- ``WATCHDOG=1`` regularly (see :attr:`SystemdNotifier.watchdog_interval`), so systemd restarts
  a worker whose loop is stuck, which a merely alive process would never reveal;
- ``STATUS=…`` a one-line free text that ``systemctl status`` shows (queues, jobs running).

We implement it ourselves instead of depending on ``python-systemd`` / ``sdnotify``: the whole
protocol is one ``sendto`` on an ``AF_UNIX``/``SOCK_DGRAM`` socket, and a C extension that needs
libsystemd headers to build is too heavy a price for that. Outside systemd (a terminal, Docker,
tests) ``$NOTIFY_SOCKET`` is unset and every method is a cheap no-op, so the worker calls them
unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from types import TracebackType

__all__ = ["SystemdNotifier"]

logger = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"

# A send must never stall the worker's event loop for long; systemd drains its notify socket
# quickly, so a full receive queue for longer than this means something is badly wrong anyway.
_SEND_TIMEOUT_SECONDS = 1.0


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``, or None when it is not one we can use.

    systemd passes either a filesystem path (``/run/systemd/notify``) or a Linux abstract socket
    name written with a leading ``@`` that stands for the NUL byte the kernel expects.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class SystemdNotifier:
    """Sends ``sd_notify`` messages to the service manager that started this process.

    The environment is read once, at construction (``environ`` defaults to ``os.environ``), so
    a notifier built in the worker's main process keeps working whatever later code does to the
    environment. Every method returns whether a datagram was actually sent; none of them raises:
    failing to talk to systemd must never take a worker (and the jobs it is running) down. The
    first failure of a run of failures is logged as a warning, the rest at debug level, so a
    vanished socket does not flood the journal with one line per watchdog ping.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET) or None
        self._address: str | bytes | None = None
        if raw is not None:
            self._address = _socket_address(raw)
            if self._address is None:
                logger.warning(
                    "ignoring %s=%r: only filesystem paths and '@' abstract sockets are supported",
                    NOTIFY_SOCKET,
                    raw,
                )
        self._watchdog_interval = self._read_watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @staticmethod
    def _read_watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec_text = env.get(WATCHDOG_USEC)
        if not usec_text:
            return None
        try:
            usec = int(usec_text)
        except ValueError:
            logger.warning("ignoring malformed %s=%r", WATCHDOG_USEC, usec_text)
            return None
        if usec <= 0:
            return None
        pid_text = env.get(WATCHDOG_PID)
        if pid_text:
            # The variables are inherited by child processes; only the process systemd meant
            # (the main PID) may ping, or a stuck worker's helper would keep it alive.
            try:
                if int(pid_text) != os.getpid():
                    return None
            except ValueError:
                logger.warning("ignoring malformed %s=%r", WATCHDOG_PID, pid_text)
                return None
        # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping is not fatal.
        return usec / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        """Whether this process runs under a service manager that listens (``$NOTIFY_SOCKET``)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1`` pings, or None when no watchdog is armed for us.

        It is half of ``$WATCHDOG_USEC`` (the unit's ``WatchdogSec=``), and None when that is
        unset, zero or malformed, or when ``$WATCHDOG_PID`` names another process. Ping from
        the loop whose liveness matters (the claim loop), not from a helper thread that would
        keep pinging while the loop is stuck.
        """
        return self._watchdog_interval

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(self._status_field(status))
        return self.notify("\n".join(fields))

    def stopping(self) -> bool:
        """Tell systemd a graceful shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``): the worker's loop is still making progress."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the free-text line ``systemctl status`` shows (``STATUS=...``)."""
        return self.notify(self._status_field(text))

    @staticmethod
    def _status_field(text: str) -> str:
        # A newline would end the assignment and start another: keep the status one line.
        return "STATUS=" + " ".join(text.splitlines())

    def notify(self, message: str) -> bool:
        """Send one raw message (newline-separated assignments); False if not sent."""
        if self._address is None:
            return False
        data = message.encode()
        with self._lock:
            try:
                if self._socket is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(_SEND_TIMEOUT_SECONDS)
                    self._socket = sock
                self._socket.sendto(data, self._address)
            except OSError as error:
                self._report_failure(message, error)
                return False
            if self._failing:
                logger.info("systemd notify socket reachable again")
                self._failing = False
            return True

    def _report_failure(self, message: str, error: OSError) -> None:
        first_line = message.split("\n", 1)[0]
        if self._failing:
            logger.debug("sd_notify %s failed again: %s", first_line, error)
            return
        self._failing = True
        logger.warning(
            "could not notify systemd (%s) at %s: %s; the worker goes on, later failures are "
            "logged at debug level",
            first_line,
            self._address_text(),
            error,
        )

    def _address_text(self) -> str:
        address = self._address
        if isinstance(address, bytes):
            return "@" + address[1:].decode(errors="replace")
        return str(address)

    def close(self) -> None:
        """Close the socket (it is reopened on the next message, if any)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        target = self._address_text() if self._address is not None else "disabled"
        return f"SystemdNotifier({target}, watchdog_interval={self._watchdog_interval})"
