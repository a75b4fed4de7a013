"""Every SQL statement pgqueue runs, loaded by name from the ``.sql`` files beside this module.

``queries.sql`` holds the queue's and the worker's statements; other files hold one feature's
each (``admin.sql``, ``schedules.sql``). Names are unique across files.

Statements name their tables as ``{schema}.jobs``; :class:`Queries` binds them to one schema
once, so the hot path never formats strings.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from pgqueue.naming import check_schema_name

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _raw_queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in sorted(files(__package__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _NAME.split(entry.read_text(encoding="utf-8"))[1:]
        for name, body in zip(parts[::2], parts[1::2], strict=True):
            if name in found:
                raise RuntimeError(f"query {name!r} is defined twice ({entry.name})")
            found[name] = body.strip()
    return found


class Queries:
    """The named statements with the schema filled in, as attributes: ``queries.enqueue``."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema_name(schema)
        self.channel = f"pgqueue_{schema}"
        for name, body in _raw_queries().items():
            setattr(self, name, body.replace("{schema}", f'"{schema}"'))

    def __getattr__(self, name: str) -> str:  # only reached for names the file lacks
        raise AttributeError(f"no query named {name!r} in queries.sql")


@cache
def queries_for(schema: str) -> Queries:
    return Queries(schema)
