"""The LISTEN connection: turns notifications into wake-ups, cancellations and settings changes.

Notifications are hints, not a source of truth: after any reconnect the worker is woken anyway,
and its poll timer covers notifications lost while the connection was down.

Behind a pooler in transaction mode, LISTEN succeeds and then never delivers (the server
connection that listens goes back to the pool). So after each connect the listener sends itself
a NOTIFY over a separate connection and waits for it: if it does not arrive, the worker says so
once and polls often instead (``on_deaf``). ``listen_dsn`` can point the listener straight at
PostgreSQL, or at a session-mode pool, while everything else goes through the pooler.

Notifications sent while no connection listened are lost: a wake-up costs nothing (the worker
claims on reconnecting), but a job handed to this worker then is claimed for it and would wait
for the lease rescue. So each connect reports when it began to listen, and the worker gives back
what was handed to it before (``release_missed_handoffs``).

A connection that heard its test can go deaf without dropping: after a switchover that left the
old primary up and read-only, it still listens there while every NOTIFY is sent on the new one.
So the test runs again every :data:`RECHECK_INTERVAL`, and at once when another service of the
worker had a write refused as read-only (``recheck``); a connection that heard once and no longer
does is replaced, and the new one reaches the server the DSN leads to now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from pgqueue._notifications import CANCEL_PREFIX, PING_PREFIX, SETTINGS_PREFIX, TAKE_PREFIX, WAKE_PREFIX
from pgqueue.worker.db import connect_kwargs

log = logging.getLogger("pgqueue.worker")
SELF_TEST_TIMEOUT = 2.0
RECHECK_INTERVAL = 30.0  # seconds between self-tests on a connection that hears
RECHECK_AT_MOST = 5.0  # seconds between self-tests asked for (a read-only server refuses often)
SLICE = 0.5  # seconds between looks at whether a self-test is due or has come back


@dataclass(frozen=True, slots=True)
class Handlers:
    on_queue: Callable[[str], None]
    on_wake: Callable[[str], None]
    on_take: Callable[[str, str], None]  # (worker id, the job as JSON)
    on_cancel: Callable[[int], None]
    on_settings: Callable[[str], None]
    on_reconnect: Callable[[datetime], None]  # listening since then, by the server's clock
    on_deaf: Callable[[bool], None]
    on_hearing: Callable[[bool], None]  # True: a self-test came back; False: deaf or disconnected


async def listen(
    listen_dsn: str,
    notify_dsn: str,
    channel: str,
    worker_id: str,
    handlers: Handlers,
    retry_delay: Callable[[int], float],
    recheck: asyncio.Event,
) -> None:
    """Run until cancelled, reconnecting with backoff whenever the connection drops, and at once
    when it no longer hears its own test after it once did."""
    failures = 0
    deaf = False
    hearing = False  # a self-test on the current connection came back
    ping = PING_PREFIX + worker_id

    def judged(test: asyncio.Task[bool | None]) -> None:
        nonlocal deaf
        result = _result(test)
        if result is None:
            return  # the self-test could not run: nothing learned
        now_deaf = result is False
        if now_deaf != deaf:
            if not (now_deaf and hearing):  # else: the loop replaces the connection, and says so
                _report(now_deaf)
            deaf = now_deaf
            handlers.on_deaf(now_deaf)
        handlers.on_hearing(not now_deaf)

    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                listen_dsn, autocommit=True, **connect_kwargs("listen", listen_dsn)
            ) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                since = await (await conn.execute("SELECT clock_timestamp() AS listening_since")).fetchone()
                assert since is not None
                if failures:
                    log.info("listener reconnected")
                failures = 0
                handlers.on_reconnect(since[0])
                heard = asyncio.Event()
                hearing = False
                test = asyncio.create_task(_self_test(notify_dsn, channel, ping, heard))
                test.add_done_callback(judged)
                recheck.clear()
                tested_at = time.monotonic()
                try:
                    while True:
                        async for note in conn.notifies(timeout=SLICE):
                            if note.payload == ping:
                                heard.set()
                            else:
                                _dispatch(note.payload, handlers)
                        if not test.done():
                            continue
                        result = _result(test)
                        if result is False and hearing:
                            log.warning(
                                "listener: its own test notification went unheard on a connection "
                                "that heard before (left on an old primary?); reconnecting"
                            )
                            break
                        hearing = hearing or result is True
                        since = time.monotonic() - tested_at
                        if since >= RECHECK_INTERVAL or (recheck.is_set() and since >= RECHECK_AT_MOST):
                            recheck.clear()
                            tested_at = time.monotonic()
                            heard.clear()
                            test = asyncio.create_task(_self_test(notify_dsn, channel, ping, heard))
                            test.add_done_callback(judged)
                finally:
                    test.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            handlers.on_hearing(False)  # until a self-test says otherwise
            failures += 1
            delay = retry_delay(failures)
            log.warning("listener connection lost (%s); reconnecting in %.1fs", exc, delay)
            await asyncio.sleep(delay)


def _result(test: asyncio.Task[bool | None]) -> bool | None:
    """A finished self-test's verdict: heard, not heard, or None when it could not run."""
    return None if test.cancelled() or test.exception() is not None else test.result()


def _dispatch(payload: str, handlers: Handlers) -> None:
    if payload.startswith(PING_PREFIX):
        pass  # another worker's self-test
    elif payload.startswith(WAKE_PREFIX):
        handlers.on_wake(payload[len(WAKE_PREFIX) :])
    elif payload.startswith(TAKE_PREFIX):
        worker_id, _, job = payload[len(TAKE_PREFIX) :].partition(" ")
        handlers.on_take(worker_id, job)
    elif payload.startswith(CANCEL_PREFIX):
        handlers.on_cancel(int(payload[len(CANCEL_PREFIX) :]))
    elif payload.startswith(SETTINGS_PREFIX):
        handlers.on_settings(payload[len(SETTINGS_PREFIX) :])
    else:
        handlers.on_queue(payload)


def _report(deaf: bool) -> None:
    if deaf:
        log.warning(
            "LISTEN does not deliver notifications on this connection (a pooler in transaction mode?): "
            "polling often instead; for instant wake-ups set PGQUEUE_LISTEN_DSN to a direct or "
            "session-mode DSN"
        )
    else:
        log.info("notifications arrive again: back to waiting for them")


async def _self_test(dsn: str, channel: str, ping: str, heard: asyncio.Event) -> bool | None:
    """NOTIFY ourselves over another connection; whether it arrived in time (None: could not send)."""
    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, **connect_kwargs("listen-test", dsn)
        ) as c:
            await c.execute("SELECT pg_notify(%s, %s)", [channel, ping])
    except Exception as exc:
        log.debug("listener self-test could not send: %s", exc)
        return None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(heard.wait(), SELF_TEST_TIMEOUT)
    return heard.is_set()
