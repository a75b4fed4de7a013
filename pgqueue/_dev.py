"""``pgqueue dev``: a first look at pgqueue with nothing installed but ``pgqueue[all]``.

One process starts a throwaway PostgreSQL (embedded-postgres, in a temporary directory),
migrates it, registers a few demo tasks that succeed, fail and retry, or dead-letter, runs a
worker and the scheduler in-process, keeps feeding demo jobs, and serves the admin dashboard.
It prints the dashboard's URL and a freshly generated token. Ctrl-C (or SIGTERM) stops the
feeder, the web server, the worker (running jobs finish), the scheduler, then the database, and
deletes its files.

``--dsn`` runs the same demo against an existing server instead (in schema ``pgqueue_dev``).

It needs the ``admin`` and ``scheduler`` extras, and ``embedded`` unless ``--dsn`` is given: they
are checked before anything starts, so a missing one is a single line naming the pip command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from pgqueue._embedded import temporary_postgres
from pgqueue._queue import Queue
from pgqueue._retry import Abort, fixed
from pgqueue.errors import ConfigurationError

if TYPE_CHECKING:  # the admin and the worker are imported when the demo starts, so that
    from pgqueue.worker import JobContext  # `pgqueue --help` stays quick

log = logging.getLogger("pgqueue.dev")
DEMO_QUEUES = ("default", "emails", "reports")
FEED_SECONDS = 2.0
# What the demo runs, by extra: a module each extra installs, to look for without importing it.
EXTRA_MODULES = {"admin": "fastapi", "scheduler": "apscheduler", "embedded": "embedded_postgres"}


def missing_extras(*, embedded: bool) -> list[str]:
    """The extras the demo needs that are not installed (``embedded`` only for its own server)."""
    wanted = [name for name in EXTRA_MODULES if embedded or name != "embedded"]
    return [name for name in wanted if importlib.util.find_spec(EXTRA_MODULES[name]) is None]


def check_extras(*, embedded: bool) -> None:
    missing = missing_extras(embedded=embedded)
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise ConfigurationError(
            f"pgqueue dev needs the {names} extra{'s' if len(missing) > 1 else ''}: "
            f"pip install 'pgqueue[{','.join(missing)}]'"
        )


# ---------------------------------------------------------------------------- the database


def embedded_postgres() -> contextlib.AbstractContextManager[tuple[str, str]]:
    """A PostgreSQL server in a temporary directory, stopped and deleted on exit:
    yields (DSN, directory)."""
    return temporary_postgres("pgqueue-dev-")


# ---------------------------------------------------------------------------- demo tasks


def demo_queue(dsn: str, schema: str) -> Queue:
    """A queue with tasks that show every path a job can take."""
    queue = Queue(dsn, schema=schema)

    @queue.task(name="demo.send_email", queue="emails", max_attempts=3, backoff=fixed(2))
    def send_email(to: str, subject: str, api_token: str) -> dict[str, Any]:
        """Succeeds, after a short pause; its api_token shows the dashboard's redaction."""
        time.sleep(random.uniform(0.05, 0.5))
        return {"delivered_to": to, "message_id": secrets.token_hex(6)}

    @queue.task(name="demo.sync_account", queue="default", max_attempts=4, backoff=fixed(3))
    def sync_account(account_id: int) -> str:
        """Fails about half the time: watch it retry, and usually succeed."""
        time.sleep(random.uniform(0.1, 0.3))
        if random.random() < 0.5:
            raise ConnectionError(f"upstream API timed out for account {account_id}")
        return "synced"

    @queue.task(name="demo.build_report", queue="reports", max_attempts=2, backoff=fixed(2))
    def build_report(report: str) -> None:
        """Always fails: dead-lettered after two attempts. Retry it from the dashboard."""
        raise ValueError(f"template for report {report!r} is missing")

    @queue.task(name="demo.resize_image", queue="default", timeout=30)
    async def resize_image(image: str, ctx: JobContext) -> dict[str, int]:
        """Async, with progress updates."""
        for step in range(1, 5):
            await asyncio.sleep(random.uniform(0.1, 0.4))
            ctx.set_progress(step * 25)
        return {"width": 1280, "height": 720}

    @queue.task(name="demo.charge_card", queue="default")
    def charge_card(order: int, card_number: str) -> None:
        """Aborts at once (no retries) for odd orders: a permanent failure."""
        if order % 2:
            raise Abort(f"card declined for order {order}")

    @queue.task(name="demo.cleanup", queue="default")
    def cleanup() -> str:
        """Fired by the scheduler every 20 s."""
        return "nothing to clean"

    queue.schedule("demo.cleanup", every=timedelta(seconds=20), name="demo-cleanup")
    queue.schedule("demo.build_report", {"report": "nightly"}, cron="0 3 * * *", name="nightly-report")
    return queue


def enqueue_demo_jobs(queue: Queue, round_number: int) -> int:
    """One round of demo traffic; every few rounds brings a job that will dead-letter."""
    jobs: list[dict[str, Any]] = [
        {
            "task": "demo.send_email",
            "args": {
                "to": f"user{random.randint(1, 999)}@example.com",
                "subject": "Welcome",
                "api_token": secrets.token_hex(8),
            },
        }
        for _ in range(random.randint(1, 4))
    ]
    jobs.append({"task": "demo.sync_account", "args": {"account_id": random.randint(1, 500)}})
    jobs.append({"task": "demo.resize_image", "args": {"image": f"photo-{random.randint(1, 99)}.jpg"}})
    if round_number % 5 == 1:  # from the first round on, so the dead letter fills at once
        jobs.append({"task": "demo.build_report", "args": {"report": f"weekly-{round_number}"}})
        for order in (2 * round_number, 2 * round_number + 1):  # the odd one is declined
            jobs.append(
                {
                    "task": "demo.charge_card",
                    "args": {"order": order, "card_number": "4111111111111111"},
                }
            )
    if round_number % 7 == 0:
        jobs.append(
            {
                "task": "demo.send_email",
                "delay": 60,
                "args": {"to": "later@example.com", "subject": "Reminder", "api_token": "t"},
            }
        )
    return len(queue.enqueue_many(jobs))


# ---------------------------------------------------------------------------- serving


def _web_server(app: Any) -> Any:
    """A uvicorn server that leaves signals to us, so one Ctrl-C stops everything in order."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            return None

    return Server(uvicorn.Config(app, log_level="warning", lifespan="on"))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror}; try another --port"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def _feed(queue: Queue, stop: asyncio.Event) -> None:
    round_number = 0
    while not stop.is_set():
        round_number += 1
        try:
            await asyncio.to_thread(enqueue_demo_jobs, queue, round_number)
        except Exception as exc:
            log.warning("demo feeder: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FEED_SECONDS)


async def serve_demo(
    queue: Queue, *, sock: socket.socket, token: str, database: str, feed: bool = True
) -> None:
    """Worker, scheduler, feeder and dashboard until SIGINT/SIGTERM, composed by the same
    :class:`~pgqueue.worker.supervisor.Supervisor` as ``pgqueue worker --with-scheduler``."""
    from pgqueue.admin import AdminAuth, AlertRule, AlertSettings, create_admin_app
    from pgqueue.scheduler import Scheduler
    from pgqueue.worker import AsyncWorker, WorkerSettings
    from pgqueue.worker.supervisor import Service, Supervisor

    loop = asyncio.get_running_loop()
    app = create_admin_app(
        queue,
        auth=AdminAuth(token=token),
        alerts=AlertSettings(rules=(AlertRule(backlog_above=200),), interval_seconds=10),
    )
    server = _web_server(app)
    worker = AsyncWorker(
        queue,
        WorkerSettings(
            queues=DEMO_QUEUES,
            concurrency=8,
            poll_interval=1.0,
            lease_seconds=15,
            grace_period=5,
        ),
        install_signal_handlers=False,  # the demo says what a first and a second Ctrl-C do
    )
    services = [Service("the dashboard", lambda: server.serve(sockets=[sock]), lambda: _exit(server))]
    if feed:
        stop_feed = asyncio.Event()
        services.append(Service("the feeder", lambda: _feed(queue, stop_feed), stop_feed.set))
    supervisor = Supervisor(worker, scheduler=Scheduler(queue), services=services)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            print("\nsecond interrupt: exiting now", flush=True)
            raise KeyboardInterrupt
        print("\nstopping: finishing running jobs (Ctrl-C again to force)", flush=True)
        supervisor.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    host, port = sock.getsockname()[:2]
    _banner(f"http://{_url_host(host)}:{port}/", token, database)
    try:
        await supervisor.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _exit(server: Any) -> None:
    server.should_exit = True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _banner(url: str, token: str, database: str) -> None:
    print(
        "\npgqueue dev is running\n"
        f"  dashboard  {url}\n"
        f"  token      {token}\n"
        f"             (sign in with it; API clients send 'Authorization: Bearer <token>')\n"
        f"  database   {database}\n"
        f"  queues     {', '.join(DEMO_QUEUES)}: demo jobs arrive every {FEED_SECONDS:g} s\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )


def _quiet_logs(verbose: bool) -> None:
    """Demo failures are the point here: keep the worker's warnings out of the terminal."""
    if not verbose:
        for name in ("pgqueue.worker", "pgqueue.job", "pgqueue.scheduler", "apscheduler"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        for name in ("embedded_postgres", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    dsn: str | None = None,
    schema: str = "pgqueue_dev",
    feed: bool = True,
    verbose: bool = False,
) -> int:
    """Run the demo until interrupted; returns the exit status (0 after a clean stop)."""
    check_extras(embedded=dsn is None)
    from pgqueue.admin import AdminAuth
    from pgqueue.admin.settings import AdminEnv
    from pgqueue.migrate import upgrade  # Alembic loads only when the demo starts

    token = token or AdminEnv.load(only=("token",)).token or secrets.token_urlsafe(24)
    AdminAuth(token=token)  # refuse a weak --token before starting anything
    _quiet_logs(verbose)
    sock = bind(host, port)
    try:
        with contextlib.ExitStack() as stack:
            if dsn is None:
                print("starting an embedded PostgreSQL…", flush=True)
                dsn, root = stack.enter_context(embedded_postgres())
                schema = "pgqueue"
                where = f"{dsn}\n             (embedded, in {root}; deleted on exit)"
            else:
                where = f"{_redact_dsn(dsn)} (schema {schema})"
            upgrade(dsn, schema=schema)
            queue = stack.enter_context(demo_queue(dsn, schema))
            try:
                asyncio.run(serve_demo(queue, sock=sock, token=token, database=where, feed=feed))
            except KeyboardInterrupt:
                return 130
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0


def _redact_dsn(dsn: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the given database"
    return f"{info.get('host') or 'local socket'}/{info.get('dbname') or ''}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pgqueue dev`` (shared by the CLI and ``python -m pgqueue._dev``)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8080, help="dashboard port (default: 8080; 0 picks one)")
    add("--token", help="admin token (default: $PGQUEUE_ADMIN_TOKEN, else a random one)")
    add("--dsn", help="use this PostgreSQL instead of an embedded one")
    add("--schema", default="pgqueue_dev", help="schema with --dsn (default: pgqueue_dev)")
    add("--no-feed", action="store_true", help="do not keep enqueueing demo jobs")
    add("--verbose", action="store_true", help="show the worker's and scheduler's logs")


def run_from_args(args: argparse.Namespace) -> int:
    return main(
        host=args.host,
        port=args.port,
        token=args.token,
        dsn=args.dsn,
        schema=args.schema,
        feed=not args.no_feed,
        verbose=args.verbose,
    )


if __name__ == "__main__":  # pragma: no cover - `python -m pgqueue._dev`
    cli = argparse.ArgumentParser(prog="pgqueue dev", description="Demo jobs and the dashboard.")
    add_arguments(cli)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        sys.exit(run_from_args(cli.parse_args()))
    except ConfigurationError as exc:  # a missing extra or a bad option: one line, as `pgqueue dev`
        sys.exit(f"pgqueue dev: {exc}")
