"""The LISTEN connection: turns notifications into wake-ups and cancellations.

Notifications are hints, not a source of truth: after any reconnect the worker is woken anyway,
and its poll timer covers notifications lost while the connection was down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

from pgqueue.notifications import CANCEL_PREFIX, SETTINGS_PREFIX

log = logging.getLogger("pgqueue.worker")


async def listen(
    dsn: str,
    channel: str,
    on_queue: Callable[[str], None],
    on_cancel: Callable[[int], None],
    on_settings: Callable[[str], None],
    on_reconnect: Callable[[], None],
    retry_delay: Callable[[int], float],
) -> None:
    """Run until cancelled, reconnecting with backoff whenever the connection drops."""
    failures = 0
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                if failures:
                    log.info("listener reconnected")
                failures = 0
                on_reconnect()
                async for note in conn.notifies():
                    if note.payload.startswith(CANCEL_PREFIX):
                        on_cancel(int(note.payload[len(CANCEL_PREFIX) :]))
                    elif note.payload.startswith(SETTINGS_PREFIX):
                        on_settings(note.payload[len(SETTINGS_PREFIX) :])
                    else:
                        on_queue(note.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            delay = retry_delay(failures)
            log.warning("listener connection lost (%s); reconnecting in %.1fs", exc, delay)
            await asyncio.sleep(delay)
