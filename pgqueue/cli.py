"""The ``pgqueue`` command: migrate, worker, enqueue, status, retry, queue settings.

Each command imports its machinery when it runs (Alembic for ``migrate``, the worker for
``worker``, FastAPI for ``admin``…): ``pgqueue --help`` and ``pgqueue enqueue`` load no more than
``import pgqueue`` does, and a command whose extra is not installed fails with one line naming it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from pgqueue._base import KEEP, QueueBase
from pgqueue._connections import classify_connection_error, resolve_dsn
from pgqueue._naming import DEFAULT_SCHEMA
from pgqueue._queue import Queue
from pgqueue.errors import ConfigurationError, PgQueueError

if TYPE_CHECKING:
    from pgqueue.scheduler import Scheduler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def load_queue(reference: str) -> QueueBase[Any]:
    """Import ``module:attribute`` (the app's Queue) the way ``uvicorn`` imports an app."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"expected MODULE:ATTRIBUTE (e.g. myapp.jobs:queue), got {reference!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    queue = getattr(module, attribute, None)
    if not isinstance(queue, QueueBase):
        raise ConfigurationError(f"{reference!r} is not a pgqueue Queue or AsyncQueue")
    return queue


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL URL (default: $PGQUEUE_DSN, then $DATABASE_URL)")
    parser.add_argument(
        "--schema",
        help="schema holding pgqueue's tables (default: $PGQUEUE_SCHEMA or 'pgqueue')",
    )


def _plain_queue(args: argparse.Namespace) -> Queue:
    queue = Queue(resolve_dsn(args.dsn), schema=args.schema)
    queue.connection_role = "cli"
    return queue


def _migrate(args: argparse.Namespace) -> int:
    # Alembic and SQLAlchemy load only for this command: workers and their child processes
    # import this module too, and start faster without them. Alembic announces each of its
    # plugins at INFO as it loads; the command prints what it did instead.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from pgqueue.migrate import current_revision, downgrade, head_revision, upgrade

    dsn = resolve_dsn(args.dsn)
    if args.downgrade:
        downgrade(dsn, schema=args.schema, revision=args.downgrade)
        print(f"schema {args.schema!r} downgraded to {args.downgrade}")
        return 0
    before = current_revision(dsn, schema=args.schema)
    upgrade(dsn, schema=args.schema, revision=args.revision)
    after = current_revision(dsn, schema=args.schema)
    change = "already at" if before == after else f"{before or 'empty'} ->"
    print(f"schema {args.schema!r}: {change} {after} (head {head_revision()})")
    return 0


def _app_queue(args: argparse.Namespace) -> QueueBase[Any]:
    """The app's queue named on the command line (or by $PGQUEUE_APP), on ``--dsn`` if given."""
    from pgqueue._settings import ClientEnv

    reference = args.app or ClientEnv.load(only=("app",)).app
    if not reference:
        raise ConfigurationError(
            f"name the app's queue: pgqueue {args.command} myapp.jobs:queue (or $PGQUEUE_APP)"
        )
    if args.dsn:
        os.environ["PGQUEUE_DSN"] = args.dsn  # for queues the app builds without a DSN
    queue = load_queue(reference)
    if args.dsn:
        queue.use_dsn(args.dsn)
    return queue


def _worker(args: argparse.Namespace) -> int:
    from pgqueue.worker import AsyncWorker, WorkerSettings
    from pgqueue.worker.core import run_to_the_end
    from pgqueue.worker.heap import freeze_startup_heap
    from pgqueue.worker.settings import parse_queue_limits, parse_queue_list
    from pgqueue.worker.supervisor import Supervisor

    queue = _app_queue(args)
    settings = WorkerSettings.from_env(
        queues=parse_queue_list(args.queues) if args.queues else None,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        queue_concurrency=parse_queue_limits(args.queue_concurrency) if args.queue_concurrency else None,
        queue_weights=parse_queue_limits(args.queue_weights) if args.queue_weights else None,
        poll_interval=args.poll_interval,
        lease_seconds=args.lease_seconds,
        grace_period=args.grace_period,
        isolation=args.isolation,
        app=args.app,  # else $PGQUEUE_APP, read with the other worker settings
    )
    scheduler = _scheduler_class()(queue) if args.with_scheduler else None
    worker = AsyncWorker(queue, settings)
    freeze_startup_heap()  # this process is ours: full collections skip the app and libraries
    run_to_the_end(Supervisor(worker, scheduler=scheduler).run())
    # A sync handler abandoned at the end of the grace period still runs in a pool thread, which
    # the interpreter would join at exit: leave now (its job is already handed back).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _scheduler_class() -> type[Scheduler]:
    """The scheduler, or a named error when its extra (APScheduler) is not installed."""
    from pgqueue._schedules import SCHEDULER_EXTRA_MISSING

    try:
        from pgqueue.scheduler import Scheduler
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "apscheduler":
            raise
        raise ConfigurationError(SCHEDULER_EXTRA_MISSING) from exc
    return Scheduler


def _scheduler(args: argparse.Namespace) -> int:
    scheduler_class = _scheduler_class()  # before the app is imported: its error is the clearer
    queue = _app_queue(args)
    scheduler_class(queue, reconcile_interval=args.reconcile_interval).run()
    return 0


def _schedules(args: argparse.Namespace) -> int:
    from datetime import timedelta

    with _plain_queue(args) as queue:
        if args.action == "add":
            if not args.name or not args.task:
                raise ConfigurationError("add needs NAME and --task")
            queue.add_schedule(
                args.name,
                args.task,
                json.loads(args.args),
                cron=args.cron,
                every=timedelta(seconds=args.every) if args.every else None,
                timezone=args.timezone,
                queue=args.queue,
            )
        elif args.action in ("pause", "resume", "remove"):
            if not args.name:
                raise ConfigurationError(f"{args.action} needs the schedule NAME")
            {
                "pause": queue.pause_schedule,
                "resume": queue.resume_schedule,
                "remove": queue.remove_schedule,
            }[args.action](args.name)
        schedules = queue.list_schedules()
    print(f"{'name':<24} {'when':<22} {'zone':<16} {'paused':<7} {'next fire (UTC)':<26} task")
    for s in schedules:
        when = s.cron if s.cron else f"every {s.every.total_seconds():g}s" if s.every else "?"
        upcoming = None if s.paused else s.next_fire_time()
        next_text = upcoming.isoformat(timespec="seconds") if upcoming else "-"
        print(f"{s.name:<24} {when:<22} {s.timezone:<16} {s.paused!s:<7} {next_text:<26} {s.task}")
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    try:
        job_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--args is not JSON: {exc}") from exc
    with _plain_queue(args) as queue:
        job_id = queue.enqueue(
            args.task,
            job_args,
            queue=args.queue,
            priority=args.priority,
            delay=args.delay,
            unique_key=args.unique_key,
        )
    print(job_id)
    return 0


def _retry(args: argparse.Namespace) -> int:
    with _plain_queue(args) as queue:
        if args.job_id is not None:
            if not queue.retry_dead(args.job_id):
                print(f"job {args.job_id} is not in the dead letter table", file=sys.stderr)
                return 1
            print(f"job {args.job_id} re-queued")
        else:
            count = queue.retry_all_dead(args.queue)
            print(f"{count} dead jobs re-queued" + (f" on queue {args.queue!r}" if args.queue else ""))
    return 0


def _queue_settings(args: argparse.Namespace) -> int:
    with _plain_queue(args) as queue:
        if args.pause:
            settings = queue.pause(args.name)
        elif args.resume:
            settings = queue.resume(args.name)
        else:
            settings = queue.configure_queue(
                args.name,
                concurrency=None if args.concurrency == 0 else (args.concurrency or KEEP),
                rate_limit=None if args.rate_limit == 0 else (args.rate_limit or KEEP),
                keep_completed=args.keep_completed,
                keep_dead=args.keep_dead,
            )
    print(
        f"queue {settings.name}: paused={settings.paused} concurrency={settings.concurrency} "
        f"rate_limit={settings.rate_limit}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from pgqueue._stats import queue_counts

    with _plain_queue(args) as queue:
        rows = queue_counts(queue)
    header = f"{'queue':<20} {'queued':>8} {'delayed':>8} {'running':>8} {'completed':>10} {'dead':>6}"
    print(header)
    for r in rows:
        print(f"{r.queue:<20} {r.queued:>8} {r.delayed:>8} {r.running:>8} {r.completed:>10} {r.dead:>6}")
    return 0


def _admin(args: argparse.Namespace) -> int:
    from pgqueue.admin import ADMIN_EXTRA_MISSING, serve

    if importlib.util.find_spec("uvicorn") is None:  # serve() imports it only once it starts
        raise ConfigurationError(f"{ADMIN_EXTRA_MISSING} (uvicorn is not installed)")

    return serve(
        args.dsn,
        schema=args.schema,
        host=args.host,
        port=args.port,
        insecure_no_auth=args.insecure_no_auth,
        root_path=args.root_path,
        log_level=args.log_level,
    )


def _dev(args: argparse.Namespace) -> int:
    from pgqueue._dev import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgqueue", description="Background jobs on PostgreSQL.")
    parser.add_argument("--log-level", help="default: $PGQUEUE_LOG_LEVEL, else INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("migrate", help="create or upgrade (or --downgrade) the schema")
    _database_options(p)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--downgrade", metavar="REVISION", help="step down to REVISION; 'base' removes everything")
    p.set_defaults(handler=_migrate)

    p = commands.add_parser("worker", help="run jobs (settings also from PGQUEUE_* variables)")
    p.add_argument("app", nargs="?", help="the app's queue as MODULE:ATTRIBUTE (or $PGQUEUE_APP)")
    p.add_argument("--dsn", help="PostgreSQL URL (overrides the app's)")
    p.add_argument("--queues", help="comma-separated queues to serve (default: default)")
    p.add_argument("--concurrency", type=int, help="jobs at once in this process (default: 10)")
    p.add_argument(
        "--prefetch", type=int, help="jobs claimed ahead into memory (default: as many as --concurrency)"
    )
    p.add_argument("--queue-concurrency", help="per-queue caps in this process, e.g. email=10,reports=2")
    p.add_argument(
        "--queue-weights",
        help="free slots go round robin across queues with ready jobs; weights, e.g. email=3 (default 1)",
    )
    p.add_argument("--poll-interval", type=float, help="seconds between polls when idle (default: 2)")
    p.add_argument("--lease-seconds", type=float, help="lease renewed by heartbeat (default: 30)")
    p.add_argument("--grace-period", type=float, help="seconds running jobs get on shutdown (default: 30)")
    p.add_argument(
        "--isolation",
        choices=["thread", "process"],
        help="where sync handlers run: threads (default), or child processes killed at their timeout",
    )
    p.add_argument("--with-scheduler", action="store_true", help="also run the scheduler in this process")
    p.set_defaults(handler=_worker)

    p = commands.add_parser("scheduler", help="enqueue recurring jobs (any number may run)")
    p.add_argument("app", nargs="?", help="the app's queue as MODULE:ATTRIBUTE (or $PGQUEUE_APP)")
    p.add_argument("--dsn", help="PostgreSQL URL (overrides the app's)")
    p.add_argument(
        "--reconcile-interval",
        type=float,
        default=5.0,
        help="seconds between reads of the schedules table",
    )
    p.set_defaults(handler=_scheduler)

    p = commands.add_parser(
        "schedules", help="list schedules with their next fire time; add/pause/resume/remove"
    )
    _database_options(p)
    p.add_argument("action", nargs="?", default="list", choices=["list", "add", "pause", "resume", "remove"])
    p.add_argument("name", nargs="?")
    p.add_argument("--task")
    p.add_argument("--args", default="{}", help="JSON object of keyword arguments")
    p.add_argument("--cron")
    p.add_argument("--every", type=float, help="seconds")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--queue")
    p.set_defaults(handler=_schedules)

    p = commands.add_parser("enqueue", help="enqueue one job by task name")
    _database_options(p)
    p.add_argument("task")
    p.add_argument("--args", default="{}", help="JSON object of keyword arguments")
    p.add_argument("--queue", help="default: the task's queue, else 'default'")
    p.add_argument("--priority", type=int)
    p.add_argument("--delay", type=float, help="seconds")
    p.add_argument("--unique-key")
    p.set_defaults(handler=_enqueue)

    p = commands.add_parser("retry", help="re-queue a dead-lettered job, or all of a queue's")
    _database_options(p)
    p.add_argument("job_id", nargs="?", type=int)
    p.add_argument("--queue", help="with no JOB_ID: only this queue's dead jobs")
    p.set_defaults(handler=_retry)

    p = commands.add_parser("queue", help="pause/resume a queue or set its global limits")
    _database_options(p)
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pause", action="store_true")
    group.add_argument("--resume", action="store_true")
    p.add_argument("--concurrency", type=int, help="global cap across workers (0 removes it)")
    p.add_argument("--rate-limit", type=float, help="jobs per second across workers (0 removes it)")
    p.add_argument("--keep-completed", type=float, help="seconds finished jobs are kept")
    p.add_argument("--keep-dead", type=float, help="seconds dead-lettered jobs are kept")
    p.set_defaults(handler=_queue_settings)

    p = commands.add_parser("status", help="jobs per queue and state")
    _database_options(p)
    p.set_defaults(handler=_status)

    p = commands.add_parser("admin", help="serve the dashboard and admin API (needs credentials)")
    _database_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="default: 8080")
    p.add_argument("--root-path", default="", help="URL prefix when a proxy serves it under a path")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without credentials (local use only: refused unless --host is loopback)",
    )
    p.set_defaults(handler=_admin)

    p = commands.add_parser("dev", help="try it: embedded PostgreSQL, demo jobs, worker, dashboard")
    from pgqueue._dev import add_arguments as dev_arguments

    dev_arguments(p)
    p.set_defaults(handler=_dev)

    debug_help = "show the traceback of an error (default: one line naming it)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for sub in commands.choices.values():  # after the command too: `pgqueue status --debug`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip() or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from pgqueue._settings import ClientEnv  # pydantic: only once a command runs

    args = build_parser().parse_args(argv)
    try:
        # Defaults from the environment, read once the command is known (see pgqueue._settings).
        env = ClientEnv.load(only=("log_level", "schema_name"))
        args.log_level = args.log_level or env.log_level
        if "schema" in args and args.schema is None:
            args.schema = env.schema_name or DEFAULT_SCHEMA
    except ConfigurationError as exc:
        print(f"pgqueue: {_one_line(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        return int(args.handler(args))
    except (PgQueueError, psycopg.Error) as exc:
        # An expected failure (bad setting, database down or refusing, schema not migrated):
        # one line that names it; the traceback only on request.
        if args.debug:
            traceback.print_exc()
        print(f"pgqueue: {_one_line(classify_connection_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
