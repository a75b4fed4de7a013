"""Fuzz the admin API from its own OpenAPI document (schemathesis, in-process ASGI).

Valid and invalid inputs for every operation, against a seeded database: no response may be a
5xx, invalid input must be refused with a 4xx, and every response must match the documented
status codes and models. Bounded to 25 examples per operation to keep the suite fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from admin_support import AUTH, TOKEN, admin_app, seed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pgqueue import Queue
from pgqueue.admin import AdminAuth, create_admin_app
from pgqueue.migrate import upgrade

EXAMPLES = 25


def operations() -> list[Any]:
    """(method, path) of every documented operation, read from an app that never connects."""
    app = create_admin_app(Queue("postgresql://unused/none"), auth=AdminAuth(token=TOKEN))
    return [
        pytest.param(m.upper(), p, id=f"{m.upper()} {p}")
        for p, ops in app.openapi()["paths"].items()
        for m in ops
    ]


@pytest.fixture(scope="module")
def api_schema(postgres_dsn: str) -> Iterator[schemathesis.schemas.BaseSchema]:
    """One seeded schema for every operation: the fuzzer may delete and retry what it likes."""
    schema = f"pgq_fuzz_{uuid.uuid4().hex[:8]}"
    upgrade(postgres_dsn, schema=schema)
    with Queue(postgres_dsn, schema=schema) as queue:
        seed(queue)
        app = admin_app(queue)  # no alert rules: /health/detailed's 503 is tested elsewhere
        yield schemathesis.openapi.from_asgi("/api/openapi.json", app)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.parametrize(("method", "path"), operations())
def test_api_answers_every_input_with_a_documented_response(
    api_schema: schemathesis.schemas.BaseSchema, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=AUTH)

    check()
