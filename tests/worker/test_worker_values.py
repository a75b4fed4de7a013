"""What a handler is given and what its outcome writes survive the trip exactly.

The worker decodes job arguments with its own jsonb decoder and sends the ack's numbers, tokens
and kinds as array literals (both cheaper than the driver's defaults); these tests hold them to
what ``json.loads`` and the driver's arrays would have given.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pgqueue import AsyncQueue, Retry
from pgqueue._jsonb import decode_stored
from pgqueue.worker import AsyncWorker

pytestmark = pytest.mark.slow

ARGUMENTS: list[dict[str, Any]] = [
    {},
    {"big": 2**200, "negative": -(2**70), "zero": 0, "tiny": 5e-324, "huge": 1.7976931348623157e308},
    {"float": 0.1 + 0.2, "exponent": 1e-7, "minus_zero": -0.0, "whole": 3.0},
    {"text": 'quote " backslash \\ tab \t newline \n', "unicode": "é 中文 🎉 \u2028 \u00a0"},
    {"nested": [[[{"a": [1, [2, [3, {"b": None}]]]}]]], "empty": [], "object": {}},
    {"bools": [True, False, None], "key with spaces": 1, "": "empty key"},
]


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1}',
        "[1, 2.5, -0, 1e400]",
        '"\\u00e9"',
        "123456789012345678901234567890",
        " [1] ",
        "[1] x",
        "[",
        "",
    ],
)
def test_the_stored_value_decoder_agrees_with_json_loads(text: str) -> None:
    """Whatever the input (the server's, or not), the same value or the same error."""
    try:
        expected: Any = json.loads(text)
    except ValueError as exc:
        with pytest.raises(type(exc)):
            decode_stored(text.encode())
        return
    assert repr(decode_stored(text.encode())) == repr(expected)


async def test_a_handler_gets_its_arguments_exactly_and_odd_retry_delays_are_written(
    async_queue: AsyncQueue,
) -> None:
    seen: list[dict[str, Any]] = []
    delays = [0.0, 1e-07, 5e-324, 0.1 + 0.2, 1.5]
    tries: dict[int, int] = {}

    @async_queue.task(name="echo")
    async def echo(**kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        return kwargs

    @async_queue.task(name="again", max_attempts=2)
    async def again(i: int) -> int:
        tries[i] = tries.get(i, 0) + 1
        if tries[i] == 1:
            raise Retry(in_=delays[i])
        return i

    echo_ids = [await async_queue.enqueue("echo", args) for args in ARGUMENTS]
    retry_ids = [await async_queue.enqueue("again", {"i": i}) for i in range(len(delays) - 1)]
    worker = AsyncWorker(async_queue, install_signal_handlers=False, queues=("default",), concurrency=4)
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(200):
            if worker.stats.completed == len(echo_ids) + len(retry_ids):
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 15)

    # What json.loads makes of the stored text, compared in a form that tells 3.0 from 3 and
    # keeps every digit (jsonb orders keys its own way, and has no -0).
    finished = f'"{async_queue.schema}".finished_jobs'
    async with async_queue.connection() as conn:
        cur = await conn.execute(
            f"SELECT args::text, result::text FROM {finished} WHERE id = ANY(%s)", [echo_ids]
        )
        stored = await cur.fetchall()
    assert len(stored) == len(ARGUMENTS)
    canonical = sorted(json.dumps(json.loads(args), sort_keys=True) for args, _ in stored)
    assert sorted(json.dumps(kwargs, sort_keys=True) for kwargs in seen) == canonical
    assert any(kwargs.get("big") == 2**200 and kwargs.get("negative") == -(2**70) for kwargs in seen)
    for args, result in stored:
        assert json.loads(result) == json.loads(args)  # the result went back through the ack
    for job_id in retry_ids:
        job = await async_queue.get_job(job_id)
        assert job is not None and job.state == "completed" and job.attempts == 2, job
        assert [e["type"] for e in job.errors] == ["Retry"], job.errors
    assert worker.stats.retried == len(retry_ids)
