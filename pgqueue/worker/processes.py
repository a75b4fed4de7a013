"""Run handlers in child processes, so a handler that runs past its timeout can be stopped.

A thread cannot be stopped: a sync handler looping past its timeout would keep running in the
worker forever. With process isolation the handler runs in a child process instead, and at the
job's timeout (or its cancellation) the child gets SIGKILL, is reaped, and its slot starts a
fresh child for the next job. Children import the app once and are reused job after job, since
their start (a new interpreter importing the app) is the expensive part.

Children are started with multiprocessing's ``spawn`` method, never ``fork``: the worker has
threads and an event loop, whose locks and state a forked child would inherit half-copied.
As with any ``spawn`` child, each one first re-imports the parent's main script (as
``__mp_main__``), so a script that starts a worker must do so under ``if __name__ == "__main__":``
(the ``pgqueue`` command does).

Each child talks to the parent over its own duplex socket pair (what ``multiprocessing.Pipe``
is on POSIX) in length-prefixed pickled tuples. The parent's end is non-blocking and read with
the event loop's ``sock_recv``, so a child that is slow, dead or stopped half-way through a
message never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

from pgqueue._retry import Retry
from pgqueue._tasks import CONTEXT_PARAMETER
from pgqueue.errors import UnstorableResult
from pgqueue.worker.context import JobContext
from pgqueue.worker.outcomes import describe, dump_result, format_traceback

if TYPE_CHECKING:
    from pgqueue._base import QueueBase

log = logging.getLogger("pgqueue.worker")

OutcomeKind = Literal["ok", "error", "timeout", "died", "cancelled"]

# A new child gets this long to start its interpreter and import the app before it is
# given up on (the job's own timeout only counts once its handler has started).
BOOT_TIMEOUT: Final = 60.0
# How long to wait for a killed child to be reaped. SIGKILL cannot be caught, so only a child
# stuck in the kernel (uninterruptible I/O) takes longer; it is then left for close().
REAP_TIMEOUT: Final = 5.0
# How often a waiting parent also checks the child's exit status, for the case where the child
# died but its socket stays open (a process it forked inherited the descriptor).
LIVENESS_INTERVAL: Final = 1.0

_HEADER: Final = struct.Struct("!Q")
_READ_SIZE: Final = 256 * 1024
_PR_SET_PDEATHSIG: Final = 1

# Messages, parent -> child: ("run", task, kwargs, context).
# Child -> parent: ("ready",) | ("boot_failed", type, message, traceback) | ("started",)
#   | ("progress", value)
#   | ("done", kind, result_json, error_type, error_message, traceback, retry_in).
# The parent's reader adds ("eof",) when the child's end closes.
Message = tuple[Any, ...]
_EOF: Final[Message] = ("eof",)


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    """What became of one handler run in a child process.

    ``exitcode`` is set for the kinds where the child is gone (``died``, ``timeout``,
    ``cancelled``); negative means the signal that ended it. For those kinds ``error_message``
    says in words what happened, so it can go straight into the job's error entry.
    """

    kind: OutcomeKind
    result_json: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    exitcode: int | None = None
    retry_in: float | None = None  # the handler raised Retry(in_=…): the wait it asked for


# --------------------------------------------------------------------------------------------
# The child's side. Everything here runs in the child process only.


def _describe(exc: BaseException) -> tuple[str, str, str | None]:
    """(type name, message, traceback) of an exception whose ``__str__`` may itself raise."""
    name, message = describe(exc)
    return name, message, format_traceback(exc)


class _ChildChannel:
    """The child's end of the socket: blocking, and safe to send on from the handler's threads."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        frame = _frame(message)  # before the lock: what cannot be pickled raises without writing
        with self._lock:
            self._sock.sendall(frame)

    def receive(self) -> Message | None:
        """The parent's next message; None once the parent closed its end (or died)."""
        header = self._read_exactly(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        payload = self._read_exactly(size)
        if payload is None:
            return None
        message = pickle.loads(payload)
        return message if isinstance(message, tuple) else None

    def _read_exactly(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = self._sock.recv(min(size - len(data), _READ_SIZE))
            if not chunk:
                return None
            data += chunk
        return bytes(data)


def _leave(code: int) -> NoReturn:
    """Exit now: threads a handler left behind must not keep the child alive, nor atexit hooks run."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            _leave(1)


def _die_with_parent(parent_pid: int) -> None:
    """Make sure the child does not outlive the worker, even while its handler is busy.

    An idle child notices the parent's end closing; a busy one would not until its handler
    returns. On Linux the kernel kills it (PR_SET_PDEATHSIG, tied to the thread that started the
    child: the event loop's); elsewhere a thread watches the parent pid.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the call took effect
                    _leave(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="pgqueue-parent", daemon=True).start()


def _load_app(app: str, env: Mapping[str, str], log_level: int | None) -> QueueBase[Any]:
    os.environ.update(env)
    # The interpreter has started by now, so PYTHONPATH from ``env`` must reach sys.path by hand.
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    from pgqueue.cli import LOG_FORMAT, load_queue

    if log_level is not None:  # so a handler's ctx.log lines are not lost in the child
        logging.basicConfig(level=log_level, format=LOG_FORMAT)
    return load_queue(app)


def _make_context(channel: _ChildChannel, fields: Mapping[str, Any]) -> JobContext:
    def report(job_id: int, attempt: int, progress: Any) -> None:
        # ctx.set_progress has validated the value already; it raises into the handler if the
        # value cannot even be pickled, rather than failing somewhere nobody sees.
        channel.send(("progress", progress))

    return JobContext(**fields, progress_sink=report)


def _run_handler(
    queue: QueueBase[Any],
    channel: _ChildChannel,
    task_name: str,
    kwargs: Mapping[str, Any],
    context: Mapping[str, Any] | None,
) -> Message:
    """Run one handler and describe its outcome; never raises, whatever the handler does."""
    try:
        task = queue.registry.require(task_name)
        call_kwargs = dict(kwargs)
        if task.takes_context:
            call_kwargs[CONTEXT_PARAMETER] = None if context is None else _make_context(channel, context)
        channel.send(("started",))
        result = asyncio.run(task.fn(**call_kwargs)) if task.is_async else task.fn(**call_kwargs)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit too: the job's error
        return ("done", "error", None, *_describe(exc), exc.delay if isinstance(exc, Retry) else None)
    try:
        text = dump_result(result)
    except UnstorableResult as exc:
        return ("done", "error", None, type(exc).__name__, str(exc), None, None)
    return ("done", "ok", text, None, None, None, None)


def _child_main(
    sock: socket.socket, app: str, env: Mapping[str, str], parent_pid: int, log_level: int | None
) -> None:
    """A child's life: import the app, then run handlers one at a time until the parent leaves."""
    # Ctrl-C reaches the worker's whole process group: the parent decides what happens to a
    # running job, so the child ignores SIGINT and moves to a group of its own (which also lets
    # the parent kill whatever the handler started along with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "setpgid"):
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    _die_with_parent(parent_pid)
    # Started as a daemon (so multiprocessing reaps it if the parent exits without close());
    # cleared here so handlers may still use multiprocessing themselves.
    multiprocessing.current_process().daemon = False
    channel = _ChildChannel(sock)
    try:
        queue = _load_app(app, env, log_level)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            channel.send(("boot_failed", *_describe(exc)))
        _leave(1)
    try:
        channel.send(("ready",))
        while True:
            message = channel.receive()
            if message is None:
                break
            if message[0] == "run":
                _, task_name, kwargs, context = message
                channel.send(_run_handler(queue, channel, task_name, kwargs, context))
    except BaseException:  # the parent went away mid-message: nobody is left to tell
        _leave(1)
    _leave(0)


# --------------------------------------------------------------------------------------------
# The parent's side.


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _frame(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class _Child:
    """One child process, the parent's end of its socket, and the messages read from it."""

    def __init__(self, process: BaseProcess, sock: socket.socket) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.sock = sock
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.exitcode: int | None = None
        self.reaped = False
        self.started_at = time.monotonic()
        self.reader = asyncio.create_task(self._read(), name=f"pgqueue-child-{self.pid}")
        # Closed once the reader is over (even if cancelled before it ran), by which time the
        # loop has dropped the socket from its selector.
        self.reader.add_done_callback(lambda _: self.sock.close())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        try:
            while True:
                data = await loop.sock_recv(self.sock, _READ_SIZE)
                if not data:
                    return
                buffer += data
                while len(buffer) >= _HEADER.size:
                    (size,) = _HEADER.unpack_from(buffer)
                    end = _HEADER.size + size
                    if len(buffer) < end:
                        break
                    message = pickle.loads(buffer[_HEADER.size : end])
                    del buffer[:end]
                    self.messages.put_nowait(message if isinstance(message, tuple) else _EOF)
        except OSError:
            pass  # a reset connection is the child dying: same as EOF
        except Exception:
            log.exception("unreadable message from handler process %d", self.pid)
        finally:
            self.messages.put_nowait(_EOF)

    async def send(self, frame: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    def poll(self) -> bool:
        """Whether the child has exited and been reaped (checks without blocking)."""
        if self.reaped:
            return True
        exitcode = self.process.exitcode  # waitpid(WNOHANG)
        if exitcode is None:
            return False
        self.exitcode = exitcode
        self.reaped = True
        self.reader.cancel()
        with contextlib.suppress(ValueError):
            self.process.close()  # releases its sentinel descriptor
        return True

    def is_alive(self) -> bool:
        return not self.poll()

    def kill(self) -> None:
        """SIGKILL the child and whatever it started in its process group."""
        # Checked first, every time: once reaped (here or by multiprocessing's own clean-up) the
        # pid may belong to another process.
        if self.poll() or self.pid <= 0:
            return
        if hasattr(os, "killpg"):
            try:
                os.killpg(self.pid, signal.SIGKILL)
                return
            except OSError:
                pass  # not yet its own group (still booting): kill the child alone
        with contextlib.suppress(OSError, ValueError):
            self.process.kill()


class ProcessSlots:
    """Child processes that run handlers one job at a time each.

    A child that runs past its job's timeout (or whose job is cancelled) is killed and replaced.

    ``app`` is the ``module:attribute`` of the app's queue, imported by each child to find the
    handlers; ``size`` bounds how many children are alive at once (the worker's concurrency);
    ``env`` is set in each child's environment before it imports the app. Children start on
    demand and are reused until one is killed or dies.
    """

    def __init__(self, app: str, size: int, *, env: Mapping[str, str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.app = app
        self.size = size
        self._env = dict(env or {})
        self._mp = multiprocessing.get_context("spawn")
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()  # every child not yet reaped
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def alive(self) -> int:
        """Children currently alive (booting, idle, busy, or killed and not yet reaped)."""
        return sum(1 for child in list(self._children) if child.is_alive())

    async def start(self) -> None:
        """Start one child ahead of the first job, so that job does not wait for the app's import.

        Failing to start is only logged: the first job then reports the failure for itself.
        """
        if self._closed or self._children:
            return
        async with self._slots:
            if self._closed or self._children:
                return
            booted = await self._boot(asyncio.Event())
            if isinstance(booted, ProcessOutcome):
                log.warning("could not start a handler process for %s: %s", self.app, booted.error_message)
            elif self._closed:
                await self._kill_and_reap(booted)
            else:
                self._idle.append(booted)

    async def run(
        self,
        task: str,
        kwargs: dict[str, Any],
        *,
        timeout: float | None,
        context: dict[str, Any] | None,
        on_progress: Callable[[Any], None],
        cancel: asyncio.Event,
    ) -> ProcessOutcome:
        """Run handler ``task`` in an idle child; never raises for anything the handler or child does.

        ``timeout`` counts from the child's report that the handler started, not from the wait
        for a free or freshly booting child. Cancelling the calling task kills the child too
        (and re-raises): whatever the handler was doing is abandoned either way.
        """
        if self._closed:
            return ProcessOutcome("died", error_message="the worker's handler processes are shut down")
        if cancel.is_set() or not await self._acquire(cancel):
            return ProcessOutcome("cancelled", error_message="cancelled before the handler started")
        try:
            return await self._run_in_slot(task, kwargs, timeout, context, on_progress, cancel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a fault of this module: the job still gets an outcome
            log.exception("running %r in a handler process failed", task)
            return ProcessOutcome("died", error_type=type(exc).__name__, error_message=str(exc))
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Kill every child and reap it; running jobs end as ``died``. Safe to call again."""
        self._closed = True
        self._idle.clear()
        children = list(self._children)
        for child in children:
            child.kill()
        await asyncio.gather(*(self._kill_and_reap(child) for child in children))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # ----------------------------------------------------------------------------------------

    async def _acquire(self, cancel: asyncio.Event) -> bool:
        """Take a slot, unless ``cancel`` is set first (then no slot is held)."""
        acquire = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(cancel.wait())
        keep = False
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
            keep = acquire.done() and not cancel.is_set()
            return keep
        finally:
            stop.cancel()
            if not acquire.done():
                acquire.cancel()  # Semaphore.acquire hands a wake-up it got on to the next waiter
            elif not keep and not acquire.cancelled() and acquire.exception() is None:
                self._slots.release()

    async def _run_in_slot(
        self,
        task: str,
        kwargs: dict[str, Any],
        timeout: float | None,
        context: dict[str, Any] | None,
        on_progress: Callable[[Any], None],
        cancel: asyncio.Event,
    ) -> ProcessOutcome:
        while True:
            if self._closed:
                return ProcessOutcome("died", error_message="the worker's handler processes are shut down")
            reused = self._take_idle()
            child: _Child
            if reused is not None:
                child = reused
            else:
                booted = await self._boot(cancel)
                if isinstance(booted, ProcessOutcome):
                    return booted
                child = booted
            try:
                outcome, started = await self._converse(
                    child, task, kwargs, timeout, context, on_progress, cancel
                )
            except BaseException:
                self._discard(child)
                raise
            if outcome.kind in ("ok", "error") and not self._closed:
                self._idle.append(child)
                return outcome
            exitcode = await self._kill_and_reap(child)
            if outcome.kind == "died" and not started and reused is not None and not self._closed:
                # An idle child died between jobs (OOM killer, someone's kill): the handler never
                # started, so this is no outcome of the job's. Try once more with a fresh child.
                log.warning(
                    "idle handler process %d %s; starting another", child.pid, _exit_description(exitcode)
                )
                continue
            return _with_exit(outcome, exitcode)

    def _take_idle(self) -> _Child | None:
        while self._idle:
            child = self._idle.pop()
            if child.is_alive():
                return child
            self._children.discard(child)
        return None

    async def _boot(self, cancel: asyncio.Event) -> _Child | ProcessOutcome:
        """A fresh child that has imported the app, or the outcome that explains why there is none."""
        loop = asyncio.get_running_loop()
        root = logging.getLogger()
        log_level = root.getEffectiveLevel() if root.handlers else None
        parent_sock, child_sock = socket.socketpair()
        try:
            process = self._mp.Process(
                target=_child_main,
                args=(child_sock, self.app, self._env, os.getpid(), log_level),
                name="pgqueue-handler",
                daemon=True,
            )
            # Started from the loop's thread: PR_SET_PDEATHSIG in the child follows this thread.
            process.start()
        except Exception as exc:
            parent_sock.close()
            log.warning("cannot start a handler process: %s", exc)
            return ProcessOutcome(
                "died", error_type=type(exc).__name__, error_message=f"cannot start a handler process: {exc}"
            )
        finally:
            child_sock.close()  # the child has its own copy; ours would hide its EOF
        parent_sock.setblocking(False)
        child = _Child(process, parent_sock)
        self._children.add(child)
        try:
            message = await self._next(child, cancel, loop.time() + BOOT_TIMEOUT)
        except BaseException:
            self._discard(child)
            raise
        if message[0] == "ready" and not self._closed:
            log.debug("handler process %d ready in %.3fs", child.pid, time.monotonic() - child.started_at)
            return child
        exitcode = await self._kill_and_reap(child)
        if self._closed:
            return ProcessOutcome("died", error_message="the worker's handler processes are shut down")
        if message[0] == "cancel":
            return ProcessOutcome(
                "cancelled", error_message="cancelled before the handler started", exitcode=exitcode
            )
        if message[0] == "boot_failed" and len(message) == 4:
            return ProcessOutcome(
                "error", error_type=message[1], error_message=message[2], traceback=message[3]
            )
        if message[0] == "timeout":
            why = f"did not import {self.app} within {BOOT_TIMEOUT:g}s"
        else:
            why = f"{_exit_description(exitcode)} while starting up (importing {self.app})"
        return ProcessOutcome("died", error_message=f"the handler process {why}", exitcode=exitcode)

    async def _converse(
        self,
        child: _Child,
        task: str,
        kwargs: dict[str, Any],
        timeout: float | None,
        context: dict[str, Any] | None,
        on_progress: Callable[[Any], None],
        cancel: asyncio.Event,
    ) -> tuple[ProcessOutcome, bool]:
        """Hand one job to ``child`` and follow it to its end: (outcome, whether the handler started)."""
        loop = asyncio.get_running_loop()
        try:
            frame = _frame(("run", task, kwargs, context))
        except Exception as exc:
            name, why, _ = _describe(exc)
            reason = f"cannot pass the job's arguments to a process: {why}"
            return ProcessOutcome("error", error_type=name, error_message=reason), False
        try:
            await child.send(frame)
        except OSError:
            return ProcessOutcome("died", error_message="the handler process exited"), False
        started = False
        deadline: float | None = None
        while True:
            message = await self._next(child, cancel, deadline)
            tag = message[0]
            if tag == "started":
                started = True
                deadline = None if timeout is None else loop.time() + timeout
            elif tag == "progress" and len(message) == 2:
                try:
                    on_progress(message[1])
                except Exception:
                    log.exception("progress callback for %r failed", task)
            elif tag == "done" and len(message) == 7 and message[1] in ("ok", "error"):
                kind, result, error_type, error_message, trace, retry_in = message[1:]
                ok = isinstance(retry_in, int | float) and not isinstance(retry_in, bool)
                retry_in = float(retry_in) if ok else None  # what crosses the pipe is checked
                outcome = ProcessOutcome(kind, result, error_type, error_message, trace, retry_in=retry_in)
                return outcome, started
            elif tag == "timeout":
                why = f"timed out after {timeout:g}s (handler process killed)"
                return ProcessOutcome("timeout", error_message=why), started
            elif tag == "cancel":
                return ProcessOutcome("cancelled", error_message="cancelled while running"), started
            elif tag == "eof":
                return ProcessOutcome("died", error_message="the handler process exited"), started

    async def _next(self, child: _Child, cancel: asyncio.Event, deadline: float | None) -> Message:
        """The child's next message, or ("cancel",) / ("timeout",) if either comes first."""
        loop = asyncio.get_running_loop()
        # Checked before any queued message, so a handler flooding progress cannot outrun them.
        if cancel.is_set():
            return ("cancel",)
        if deadline is not None and loop.time() >= deadline:
            return ("timeout",)
        if not child.messages.empty():
            return child.messages.get_nowait()
        get = asyncio.ensure_future(child.messages.get())
        stop = asyncio.ensure_future(cancel.wait())
        dead_since: float | None = None
        try:
            while True:
                wait = (
                    LIVENESS_INTERVAL if deadline is None else min(LIVENESS_INTERVAL, deadline - loop.time())
                )
                await asyncio.wait({get, stop}, timeout=max(0.0, wait), return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    return get.result()
                if stop.done():
                    return ("cancel",)
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return ("timeout",)
                if child.is_alive():
                    dead_since = None
                elif dead_since is None:
                    dead_since = now  # give its last messages and EOF a moment to arrive
                elif now - dead_since >= LIVENESS_INTERVAL:
                    return _EOF
        finally:
            for future in (get, stop):
                if not future.done():
                    future.cancel()

    async def _kill_and_reap(self, child: _Child) -> int | None:
        """SIGKILL the child (a no-op if it has exited) and wait, without blocking, until it is reaped."""
        child.kill()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REAP_TIMEOUT
        delay = 0.001
        while not child.poll():
            if loop.time() >= deadline:
                log.warning("handler process %d did not exit %gs after SIGKILL", child.pid, REAP_TIMEOUT)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._children.discard(child)
        return child.exitcode

    def _discard(self, child: _Child) -> None:
        """Kill a child now and reap it in the background (the caller is being cancelled)."""
        child.kill()
        reap = asyncio.ensure_future(self._kill_and_reap(child))
        self._background.add(reap)
        reap.add_done_callback(self._background.discard)


def _with_exit(outcome: ProcessOutcome, exitcode: int | None) -> ProcessOutcome:
    if outcome.kind == "died":
        message = f"the handler process {_exit_description(exitcode)} before finishing"
        return replace(outcome, exitcode=exitcode, error_message=message)
    return replace(outcome, exitcode=exitcode)
