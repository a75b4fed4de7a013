"""Timestamps that Python cannot hold load clamped, instead of failing the whole query.

PostgreSQL's timestamps reach year 294276 and have ``infinity`` / ``-infinity``; Python's
datetime stops at year 9999. psycopg refuses such a value with ``DataError``, so one row written
by hand, by an older version or by another client would make ``get_job`` and every admin list
that includes it fail. pgqueue's own connections (and the cursor of ``get_job`` on a caller's
connection) load them as ``datetime.max`` / ``datetime.min`` instead: the row stays readable and
sorts where it belongs. Loaders are registered per connection or cursor, never on psycopg's
global adapters, so the caller's other connections keep psycopg's behaviour.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.abc import AdaptContext, Buffer
from psycopg.types.datetime import (
    TimestampBinaryLoader,
    TimestampLoader,
    TimestamptzBinaryLoader,
    TimestamptzLoader,
)

LATEST_AWARE = datetime.max.replace(tzinfo=UTC)
EARLIEST_AWARE = datetime.min.replace(tzinfo=UTC)


def _text_is_early(data: Buffer) -> bool | None:
    """Which end a text timestamp that Python refused lies beyond: True before year 1, False
    after year 9999, None if neither (a value psycopg could not parse for another reason)."""
    text = bytes(data).strip()
    if text == b"-infinity" or text.endswith(b"BC"):
        return True
    tokens = text.split()
    if text == b"infinity" or (
        tokens
        # The date comes first (ISO, SQL, German styles: at most 10 characters with a 4-digit
        # year) or the year comes last (Postgres style): a longer one is past year 9999.
        and (len(tokens[0]) > 10 or (tokens[-1].isdigit() and len(tokens[-1]) > 4))
    ):
        return False
    return None


class ClampedTimestamptzLoader(TimestamptzLoader):
    """Text ``timestamptz``; out-of-range values load as the aware (UTC) datetime bounds."""

    def load(self, data: Buffer) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            early = _text_is_early(data)
            if early is None:
                raise
            return EARLIEST_AWARE if early else LATEST_AWARE


class ClampedTimestamptzBinaryLoader(TimestamptzBinaryLoader):
    """Binary ``timestamptz``: microseconds from 2000-01-01, whose sign tells which bound."""

    def load(self, data: Buffer) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            return EARLIEST_AWARE if bytes(data)[:1] >= b"\x80" else LATEST_AWARE


class ClampedTimestampLoader(TimestampLoader):
    """Text ``timestamp`` (no zone): out-of-range values load as the naive datetime bounds."""

    def load(self, data: Buffer) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            early = _text_is_early(data)
            if early is None:
                raise
            return datetime.min if early else datetime.max


class ClampedTimestampBinaryLoader(TimestampBinaryLoader):
    """Binary ``timestamp`` (no zone), clamped like the text one."""

    def load(self, data: Buffer) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            return datetime.min if bytes(data)[:1] >= b"\x80" else datetime.max


def register_timestamp_loaders(context: AdaptContext) -> None:
    """Load out-of-range timestamps clamped on this connection or cursor only."""
    adapters = context.adapters
    adapters.register_loader("timestamptz", ClampedTimestamptzLoader)
    adapters.register_loader("timestamptz", ClampedTimestamptzBinaryLoader)
    adapters.register_loader("timestamp", ClampedTimestampLoader)
    adapters.register_loader("timestamp", ClampedTimestampBinaryLoader)


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """The ``configure`` callback of pgqueue's sync pools."""
    register_timestamp_loaders(conn)


async def configure_async_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """The ``configure`` callback of pgqueue's async pools."""
    register_timestamp_loaders(conn)
