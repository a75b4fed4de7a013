"""Write the synchronous twin of each asyncio client module, or check that it is up to date.

    .venv/bin/python tools/async_to_sync.py           # rewrite the sync modules
    .venv/bin/python tools/async_to_sync.py --check   # exit 1, with a diff, if one differs (CI)

The asyncio code is the one that is edited: the sync module is derived from it, so the two
cannot drift. The conversion works line by line and keeps comments and layout:

* ``async def/with/for`` lose ``async``, ``await`` disappears, and the names in
  :data:`RENAMES` become their sync counterparts (``AsyncConnection`` -> ``Connection``...);
* a line ending in ``# async-only`` is left out;
* a comment ``# sync: <code>`` becomes ``<code>`` at the comment's indentation.

Only the module docstring is replaced (each pair names its own), and the imports are sorted
with ruff's isort rules (the sync-only imports are ``# sync:`` lines after the async ones);
nothing else is reformatted, so what the tool writes is what ruff and mypy check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    docstring: str


PAIRS = [
    Pair(
        "pgqueue/_aqueue.py",
        "pgqueue/_queue.py",
        '"""The synchronous queue: what a (threaded) app uses to enqueue, inspect and cancel jobs.\n\n'
        "Generated from :mod:`pgqueue._aqueue` by ``tools/async_to_sync.py``: edit that file and run the\n"
        'tool; CI fails when this one differs from what the tool writes.\n"""',
    ),
]

# Longest first, each as a whole word: the async name on the left, the sync one on the right.
RENAMES = {
    "observed_async_connection_class": "observed_connection_class",
    "configure_async_connection": "configure_connection",
    "AsyncScheduleStore": "ScheduleStore",
    "AsyncConnectionPool": "ConnectionPool",
    "asynccontextmanager": "contextmanager",
    "async_connection": "sync_connection",
    "AsyncConnection": "Connection",
    "AsyncIterator": "Iterator",
    "connect_async": "connect",
    "AsyncQueue": "Queue",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "AsyncPool": "Pool",
}
_RENAME = re.compile(r"\b(" + "|".join(map(re.escape, RENAMES)) + r")\b")
_AWAITABLE = re.compile(r"\bAwaitable\[([^\[\]]+)\]")
_ASYNC_KEYWORD = re.compile(r"\basync (def|with|for)\b")
_AWAIT = re.compile(r"\bawait ")
_SYNC_LINE = re.compile(r"^(\s*)# sync: ?(.*)$")
_ASYNC_ONLY = re.compile(r"\s*# async-only$")
_DOCSTRING = re.compile(r'\A"""(?:.|\n)*?"""', re.MULTILINE)


def to_sync(source: str, docstring: str) -> str:
    """The sync module for the asyncio ``source`` (see the module docstring for the rules)."""
    body, count = _DOCSTRING.subn(docstring, source, count=1)
    if count != 1:
        raise SystemExit("the async module must start with its docstring")
    lines = []
    for line in body.splitlines():
        if _ASYNC_ONLY.search(line):
            continue
        sync_line = _SYNC_LINE.match(line)
        if sync_line:
            indent, code = sync_line.groups()
            lines.append(indent + code if code else "")
            continue
        line = _ASYNC_KEYWORD.sub(r"\1", line)
        line = _AWAIT.sub("", line)
        line = _AWAITABLE.sub(r"\1", line)
        line = _RENAME.sub(lambda m: RENAMES[m.group(1)], line)
        line = line.replace('"pgqueue-async-', '"pgqueue-')
        lines.append(line.rstrip())
    return _sort_imports("\n".join(lines) + "\n")


def _sort_imports(code: str) -> str:
    """The module with its imports sorted by ruff (run from the venv that has the dev tools)."""
    command = [sys.executable, "-m", "ruff", "check", "--select", "I", "--fix-only", "--quiet"]
    result = subprocess.run(
        [*command, "--stdin-filename", "pgqueue/generated.py", "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"ruff could not sort the imports: {result.stderr.strip()}")
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a sync module is out of date")
    check = parser.parse_args().check
    stale = 0
    for pair in PAIRS:
        expected = to_sync((ROOT / pair.source).read_text(encoding="utf-8"), pair.docstring)
        target = ROOT / pair.target
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current == expected:
            continue
        if check:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    pair.target,
                    f"{pair.target} (from {pair.source})",
                )
            )
        else:
            target.write_text(expected, encoding="utf-8")
            print(f"wrote {pair.target} from {pair.source}")
    if stale:
        print(f"\n{stale} sync module(s) differ from their async source: run {Path(__file__).name}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
