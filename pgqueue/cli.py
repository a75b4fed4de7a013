"""The ``pgqueue`` command: migrate, and (as they land) worker, scheduler, admin and dev."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pgqueue.connections import resolve_dsn
from pgqueue.errors import PgQueueError
from pgqueue.migrate import DEFAULT_SCHEMA, current_revision, downgrade, head_revision, upgrade


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", help="PostgreSQL URL (default: $PGQUEUE_DSN, then $DATABASE_URL)"
    )
    parser.add_argument(
        "--schema",
        default=os.environ.get("PGQUEUE_SCHEMA", DEFAULT_SCHEMA),
        help="schema holding pgqueue's tables (default: $PGQUEUE_SCHEMA or 'pgqueue')",
    )


def _migrate(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    if args.downgrade:
        downgrade(dsn, schema=args.schema, revision=args.downgrade)
        print(f"schema {args.schema!r} downgraded to {args.downgrade}")
    else:
        before = current_revision(dsn, schema=args.schema)
        upgrade(dsn, schema=args.schema, revision=args.revision)
        after = current_revision(dsn, schema=args.schema)
        change = "already at" if before == after else f"{before or 'empty'} ->"
        print(f"schema {args.schema!r}: {change} {after} (head {head_revision()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgqueue", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    migrate = commands.add_parser("migrate", help="create or upgrade (or --downgrade) the schema")
    _add_database_options(migrate)
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.add_argument(
        "--downgrade", metavar="REVISION", help="step down to REVISION; 'base' removes everything"
    )
    migrate.set_defaults(handler=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except PgQueueError as exc:
        print(f"pgqueue: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
