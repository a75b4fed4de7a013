"""Run the standalone admin: from the environment (``api/asgi.py``) or the CLI (``pgqueue admin``).

Settings come from ``PGQUEUE_*`` variables so a systemd unit, a container and the CLI configure
it the same way; the CLI's options override them.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI

from pgqueue._connections import resolve_dsn
from pgqueue._naming import DEFAULT_SCHEMA
from pgqueue._queue import Queue
from pgqueue._settings import ClientEnv
from pgqueue.admin.alerts import alerts_from_env
from pgqueue.admin.app import create_admin_app
from pgqueue.admin.auth import AdminAuth, is_loopback
from pgqueue.admin.settings import AdminOptions
from pgqueue.errors import ConfigurationError

_TRUE = {"1", "true", "yes", "on"}


def app_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    dsn: str | None = None,
    schema: str | None = None,
    insecure_no_auth: bool = False,
) -> FastAPI:
    """The standalone app, configured by ``PGQUEUE_DSN``/``DATABASE_URL``, ``PGQUEUE_SCHEMA``,
    ``PGQUEUE_ADMIN_TOKEN`` or ``PGQUEUE_ADMIN_USER``/``PGQUEUE_ADMIN_PASSWORD``,
    ``PGQUEUE_ADMIN_ALLOWED_HOSTS``/``PGQUEUE_ADMIN_TRUSTED_ORIGINS``,
    ``PGQUEUE_ADMIN_PUBLIC_METRICS``/``PGQUEUE_ADMIN_PUBLIC_HEALTH``,
    ``PGQUEUE_ADMIN_MAX_BODY_BYTES`` and ``PGQUEUE_ADMIN_ALERT_*``.

    Raises :class:`ConfigurationError` without credentials unless ``insecure_no_auth``.
    """
    auth = AdminAuth.from_env(environ, insecure_no_auth=insecure_no_auth)
    client = ClientEnv.load(environ, only=("dsn", "database_url", "schema_name"))
    queue = Queue(
        resolve_dsn(dsn or client.dsn or client.database_url),
        schema=schema or client.schema_name or DEFAULT_SCHEMA,
    )
    options = AdminOptions.from_env(environ)
    alerts = alerts_from_env(environ)
    return create_admin_app(queue, auth=auth, alerts=alerts, options=options, close_queue=True)


def serve(
    dsn: str | None = None,
    *,
    schema: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    insecure_no_auth: bool = False,
    root_path: str = "",
    log_level: str = "info",
) -> int:
    """``pgqueue admin``: serve the dashboard and API with uvicorn until interrupted.

    ``insecure_no_auth`` is refused on anything but a loopback address: an open admin on a
    network interface lets anyone delete jobs.
    """
    import uvicorn

    if insecure_no_auth and not is_loopback(host):
        raise ConfigurationError(
            f"--insecure-no-auth only binds to a loopback address (127.0.0.1), not {host!r}"
        )
    app = app_from_env(dsn=dsn, schema=schema, insecure_no_auth=insecure_no_auth)
    print(f"pgqueue admin on http://{host}:{port}{root_path}/", flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        root_path=root_path,
        log_level=log_level.lower(),
        proxy_headers=True,
    )
    return 0
