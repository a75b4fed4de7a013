"""The admin: a FastAPI router and standalone app with a dashboard, JSON API, health, metrics
and alerts over a pgqueue database.

>>> from pgqueue import Queue
>>> from pgqueue.admin import AdminAuth, create_admin_router
>>> router = create_admin_router(Queue(dsn), auth=AdminAuth(token=TOKEN))  # doctest: +SKIP
>>> app.include_router(router, prefix="/admin")                            # doctest: +SKIP
"""

from pgqueue.admin.alerts import AlertMonitor, AlertSettings
from pgqueue.admin.app import create_admin_app, create_admin_router
from pgqueue.admin.auth import AdminAuth
from pgqueue.admin.checks import AlertRule
from pgqueue.admin.redaction import Redactor, default_redact, mask_keys, no_redaction
from pgqueue.admin.schemas import AlertEvent
from pgqueue.admin.serve import app_from_env, serve
from pgqueue.admin.settings import AdminOptions

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
