"""The admin: a FastAPI router and standalone app with a dashboard, JSON API, health, metrics
and alerts over a pgqueue database.

>>> from pgqueue import Queue
>>> from pgqueue.admin import AdminAuth, create_admin_router
>>> router = create_admin_router(Queue(dsn), auth=AdminAuth(token=TOKEN))  # doctest: +SKIP
>>> app.include_router(router, prefix="/admin")                            # doctest: +SKIP

FastAPI, Jinja2, Prometheus' client and uvicorn are the ``admin`` extra, which a producer or a
worker does not install: importing this package without them raises a
:class:`~pgqueue.errors.ConfigurationError` that names the pip command, instead of an ImportError
from deep inside.
"""

from pgqueue.errors import ConfigurationError

ADMIN_EXTRA_MODULES = frozenset({"fastapi", "starlette", "jinja2", "prometheus_client", "uvicorn"})
ADMIN_EXTRA_MISSING = "the admin needs the admin extra: pip install 'pgqueue[admin]'"

try:
    from pgqueue.admin.alerts import AlertMonitor, AlertSettings
    from pgqueue.admin.app import create_admin_app, create_admin_router
    from pgqueue.admin.auth import AdminAuth
    from pgqueue.admin.checks import AlertRule
    from pgqueue.admin.redaction import Redactor, default_redact, mask_keys, no_redaction
    from pgqueue.admin.schemas import AlertEvent
    from pgqueue.admin.serve import app_from_env, serve
    from pgqueue.admin.settings import AdminOptions
except ImportError as exc:
    if (exc.name or "").partition(".")[0] not in ADMIN_EXTRA_MODULES:
        raise  # a real bug, not a missing extra
    raise ConfigurationError(f"{ADMIN_EXTRA_MISSING} ({exc.name} is not installed)") from exc

__all__ = [
    "AdminAuth",
    "AdminOptions",
    "AlertEvent",
    "AlertMonitor",
    "AlertRule",
    "AlertSettings",
    "Redactor",
    "app_from_env",
    "create_admin_app",
    "create_admin_router",
    "default_redact",
    "mask_keys",
    "no_redaction",
    "serve",
]
