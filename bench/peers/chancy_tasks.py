"""Chancy's jobs are named by import path, so its handlers live in a module of their own."""

from __future__ import annotations

from typing import Any

import _driver as d


async def noop(**args: Any) -> None:
    d.noop_handler_body(args)


async def sleep(**args: Any) -> None:
    await d.sleep_handler_body(args)
