"""ASGI entry of the standalone pgqueue admin service (dashboard, JSON API, health, metrics).

Every setting comes from the environment (see admin.env.example next to this file):

    PGQUEUE_DSN=postgresql://... PGQUEUE_ADMIN_TOKEN=... \\
        uvicorn api.asgi:app --host 127.0.0.1 --port 8080 --proxy-headers   # repo root
    uvicorn --app-dir /opt/pgqueue/api asgi:app --host 127.0.0.1 --port 8080  # deployed

Importing this module fails with a clear ConfigurationError when no credentials are set: the
service never starts open. Run one process per database (its Prometheus counters are
per-process); ``pgqueue admin`` serves the same app from the command line.
"""

from pgqueue.admin import app_from_env

app = app_from_env()
