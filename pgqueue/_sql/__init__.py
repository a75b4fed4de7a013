"""Every SQL statement pgqueue runs, by name, from the ``.sql`` files beside this module.

One file per entity: ``jobs.sql`` (enqueue, read, cancel, retry from the dead letter, the
operator's one-job writes), ``worker.sql`` (claim, acknowledge, heartbeat, progress,
registration), ``maintenance.sql`` (lease rescue, retention), ``queues.sql`` (settings,
wake-ups, counts), ``schedules.sql``, and ``admin.sql`` (reads only the admin makes). Each
statement exists once; a part shared by two statements (or branches of one) is a
``-- fragment: name`` block that statements include as ``{name}``.

:class:`Queries` declares each statement as a typed attribute, so a misspelt name fails the type
checker instead of a running worker, and it refuses to build when the files and the
declarations disagree in either direction. Statements name their tables as ``{schema}.jobs``;
an instance binds them to one schema once, so the hot path never formats strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib.resources import files

from pgqueue._naming import check_schema_name

_BLOCK = re.compile(r"^-- (name|fragment): (\w+)\s*$", re.MULTILINE)
_REFERENCE = re.compile(r"\{([A-Za-z_]\w*)\}")  # not a regex quantifier such as {4}
_SCHEMA = "{schema}"


class Queries:
    """The named statements with the schema filled in, as attributes: ``queries.enqueue``."""

    schema: str
    channel: str
    """The LISTEN/NOTIFY channel of the schema's queues."""

    # jobs.sql
    enqueue: str
    find_unique: str
    reserve_ids: str
    copy_jobs: str
    copy_jobs_due_now: str
    enqueue_many_unique: str
    find_unique_many: str
    get_job: str
    cancel_jobs: str
    retry_dead: str
    run_now: str
    run_retrying: str
    copy_finished_job: str
    delete_job: str
    # worker.sql
    claim: str
    start_waiting: str
    release_missed_handoffs: str
    stop_waiting: str
    pass_wake: str
    lock_queue: str
    claim_limited: str
    next_run_at: str
    ack: str
    heartbeat: str
    save_progress: str
    deregister_worker: str
    schema_version: str
    # maintenance.sql
    expired_leases: str
    rescue_expired: str
    forget_dead_workers: str
    try_maintenance_lock: str
    delete_finished_jobs: str
    prune_completed_count: str
    delete_dead_jobs: str
    # queues.sql
    queue_settings: str
    set_queue: str
    wake_queues: str
    queue_overview: str
    # schedules.sql
    upsert_schedule: str
    delete_stale_code_schedules: str
    list_schedules: str
    set_schedule_paused: str
    delete_schedule: str
    claim_fire: str
    set_next_fire: str
    # admin.sql
    admin_queue_runs: str
    admin_throughput: str
    admin_worker_seen: str
    admin_failures: str
    admin_finished_between: str
    admin_dead_between: str
    admin_clock: str
    admin_list_jobs: str
    admin_workers: str
    admin_live_workers: str
    admin_abandoned_threads: str

    def __init__(self, schema: str, statements: Mapping[str, str] | None = None) -> None:
        """``statements`` (by name, ``{schema}`` unbound) defaults to the packaged files."""
        self.schema = check_schema_name(schema)
        self.channel = f"pgqueue_{schema}"
        found = packaged_statements() if statements is None else statements
        check_declared(found)
        quoted = f'"{schema}"'
        bound = {name: text.replace(_SCHEMA, quoted) for name, text in found.items()}
        for name, text in bound.items():
            setattr(self, name, text)


_NOT_STATEMENTS = frozenset({"schema", "channel"})
DECLARED = frozenset(Queries.__annotations__) - _NOT_STATEMENTS
"""The statement names the ``.sql`` files must define, no more and no fewer."""


def check_declared(statements: Mapping[str, str]) -> None:
    """Raise unless the statements are exactly the declared ones: a statement nobody declared
    is one no code can reach (or a typo), a declared one with no text fails only when used."""
    undeclared = sorted(set(statements) - DECLARED)
    missing = sorted(DECLARED - set(statements))
    problems = []
    if undeclared:
        problems.append(f"defined in pgqueue/_sql but not declared on Queries: {', '.join(undeclared)}")
    if missing:
        problems.append(f"declared on Queries but defined in no .sql file: {', '.join(missing)}")
    if problems:
        raise RuntimeError("; ".join(problems))


def _trim(body: str, *, leading_comments: bool) -> str:
    """The block's SQL without the comment lines that end it (the next section's heading) and,
    for a fragment, without those that start it (its documentation, not part of what it adds)."""
    lines = body.strip().splitlines()
    while lines and lines[-1].lstrip().startswith("--"):
        lines.pop()
    while leading_comments and lines and lines[0].lstrip().startswith("--"):
        lines.pop(0)
    return "\n".join(lines).strip()


def parse(sources: Mapping[str, str]) -> dict[str, str]:
    """Statements by name from ``.sql`` texts by file name, fragments included.

    Refuses a name defined twice (in any files, statements and fragments alike) and a
    ``{reference}`` to no fragment.
    """
    blocks: dict[str, tuple[str, str, str]] = {}  # name -> (kind, file, text)
    for file, text in sorted(sources.items()):
        parts = _BLOCK.split(text)[1:]
        for kind, name, body in zip(parts[::3], parts[1::3], parts[2::3], strict=True):
            if name in blocks:
                raise RuntimeError(f"query {name!r} is defined twice ({blocks[name][1]}, {file})")
            blocks[name] = (kind, file, _trim(body, leading_comments=kind == "fragment"))
    fragments = {name: body for name, (kind, _, body) in blocks.items() if kind == "fragment"}

    def include(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "schema":
            return _SCHEMA
        if name not in fragments:
            raise RuntimeError(f"{{{name}}} names no fragment in pgqueue/_sql")
        line_start = match.string.rfind("\n", 0, match.start()) + 1
        indent = match.string[line_start : match.start()]
        # Indented like the line that includes it, so the SQL the server logs reads as written.
        return fragments[name].replace("\n", "\n" + indent) if indent.isspace() else fragments[name]

    statements = {}
    for name, (kind, file, body) in blocks.items():
        if kind == "name":
            text = _REFERENCE.sub(include, body)
            if set(_REFERENCE.findall(text)) - {"schema"}:
                raise RuntimeError(f"query {name!r} ({file}): a fragment includes another; they do not nest")
            statements[name] = text
    return statements


@cache
def packaged_statements() -> dict[str, str]:
    """The statements of the ``.sql`` files shipped with this package, read once."""
    sources = {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in files(__package__).iterdir()
        if entry.name.endswith(".sql")
    }
    return parse(sources)


@cache
def queries_for(schema: str) -> Queries:
    return Queries(schema)


_PLACEHOLDER = re.compile(r"%\((\w+)\)[sb]")


def numbered(query: str) -> tuple[str, list[str]]:
    """``query`` with its psycopg placeholders (``%(name)s``, binary ``%(name)b``) as ``$n``, in
    order of first use, and those names: the form ``PREPARE`` takes, for reading a statement's
    plan as the server plans it for a worker (the plan tests, ``bench.ack_plans``)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _PLACEHOLDER.sub(number, query), names
