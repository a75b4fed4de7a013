"""Statements a worker service sends together: one round trip where libpq can pipeline."""

from __future__ import annotations

import psycopg
import pytest

from pgqueue.worker.db import execute_together


@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelined", "libpq-without-pipelines"])
async def test_statements_sent_together_answer_in_order_and_leave_the_connection_as_it_was(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, pipelines: bool
) -> None:
    if not pipelines:  # what an old system libpq reports
        monkeypatch.setattr(psycopg.AsyncPipeline, "is_supported", classmethod(lambda cls: False))
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        first, second = await execute_together(
            conn, [("SELECT %(n)s::int", {"n": 7}), ("SELECT %(word)s::text", {"word": "seven"})]
        )
        assert await first.fetchone() == (7,)
        assert await second.fetchone() == ("seven",)
        # An error in one of them is raised, and the connection serves the next statement.
        with pytest.raises(psycopg.errors.DivisionByZero):
            await execute_together(conn, [("SELECT 1", {}), ("SELECT 1 / 0", {})])
        cur = await conn.execute("SELECT 'still usable'")
        assert await cur.fetchone() == ("still usable",)
