"""The LISTEN connection: turns notifications into wake-ups, cancellations and settings changes.

Notifications are hints, not a source of truth: after any reconnect the worker is woken anyway,
and its poll timer covers notifications lost while the connection was down.

Behind a pooler in transaction mode, LISTEN succeeds and then never delivers (the server
connection that listens goes back to the pool). So after each connect the listener sends itself
a NOTIFY over a separate connection and waits for it: if it does not arrive, the worker says so
once and polls often instead (``on_deaf``). ``listen_dsn`` can point the listener straight at
PostgreSQL, or at a session-mode pool, while everything else goes through the pooler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgqueue._notifications import CANCEL_PREFIX, PING_PREFIX, SETTINGS_PREFIX, WAKE_PREFIX
from pgqueue.worker.db import connect_kwargs

log = logging.getLogger("pgqueue.worker")
SELF_TEST_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Handlers:
    on_queue: Callable[[str], None]
    on_wake: Callable[[str], None]
    on_cancel: Callable[[int], None]
    on_settings: Callable[[str], None]
    on_reconnect: Callable[[], None]
    on_deaf: Callable[[bool], None]
    on_hearing: Callable[[bool], None]  # True: a self-test came back; False: deaf or disconnected


async def listen(
    listen_dsn: str,
    notify_dsn: str,
    channel: str,
    worker_id: str,
    handlers: Handlers,
    retry_delay: Callable[[int], float],
) -> None:
    """Run until cancelled, reconnecting with backoff whenever the connection drops."""
    failures = 0
    deaf = False
    ping = PING_PREFIX + worker_id

    def judged(test: asyncio.Task[bool | None]) -> None:
        nonlocal deaf
        if test.cancelled() or test.exception() is not None or test.result() is None:
            return  # the self-test could not run: nothing learned
        now_deaf = test.result() is False
        if now_deaf != deaf:
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
                if failures:
                    log.info("listener reconnected")
                failures = 0
                handlers.on_reconnect()
                heard = asyncio.Event()
                test = asyncio.create_task(_self_test(notify_dsn, channel, ping, heard))
                test.add_done_callback(judged)
                try:
                    async for note in conn.notifies():
                        payload = note.payload
                        if payload == ping:
                            heard.set()
                        elif payload.startswith(PING_PREFIX):
                            pass  # another worker's self-test
                        elif payload.startswith(WAKE_PREFIX):
                            handlers.on_wake(payload[len(WAKE_PREFIX) :])
                        elif payload.startswith(CANCEL_PREFIX):
                            handlers.on_cancel(int(payload[len(CANCEL_PREFIX) :]))
                        elif payload.startswith(SETTINGS_PREFIX):
                            handlers.on_settings(payload[len(SETTINGS_PREFIX) :])
                        else:
                            handlers.on_queue(payload)
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
