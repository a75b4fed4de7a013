"""How the admin app measures and shows things: windows, page sizes, what is public; and
:class:`AdminEnv`, every ``PGQUEUE_ADMIN_*`` variable parsed in one place.

Kept apart from credentials (:mod:`pgqueue.admin.auth`) and alert rules
(:mod:`pgqueue.admin.alerts`) so each can be built, tested and read from the environment alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_settings import NoDecode, SettingsConfigDict

from pgqueue._settings import ENV_PREFIX, EnvSettings, strip
from pgqueue.errors import ConfigurationError

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
_TRUE = frozenset({"1", "true", "yes", "on"})


def _flag(value: Any) -> Any:
    """On only for 1/true/yes/on; anything else is off. Lenient on purpose: these flags make
    endpoints public, so a value nobody recognises must leave them private, not stop the admin."""
    return value.strip().lower() in _TRUE if isinstance(value, str) else value


def _csv(value: Any) -> Any:
    """``"a.example, b.example,"`` → ``("a.example", "b.example")``."""
    if isinstance(value, str):
        return tuple(item for item in (part.strip() for part in value.split(",")) if item)
    return value


def _json_object(value: Any) -> Any:
    """HTTP headers as a JSON object; values that are JSON numbers become their text."""
    value = strip(value)
    if not isinstance(value, str):
        return value
    parsed = json.loads(value)  # its ValueError is reported naming the variable
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object")
    return {str(k): str(v) for k, v in parsed.items()}


Flag = Annotated[bool, BeforeValidator(_flag)]
# Blank counts as unset for the admin's numbers, as it always has.
Number = Annotated[float | None, BeforeValidator(strip)]
Csv = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_csv)]


class AdminEnv(EnvSettings):
    """What the environment says about the admin: every ``PGQUEUE_ADMIN_*`` variable, ``None``
    (or empty) where unset. Credentials go to :class:`~pgqueue.admin.auth.AdminAuth`, the
    ``ALERT_*`` ones to :class:`~pgqueue.admin.alerts.AlertSettings`, the rest to
    :class:`AdminOptions`; each keeps its own checks."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}ADMIN_")

    token: str | None = None
    user: str | None = None
    password: str | None = None
    trusted_origins: Csv = ()
    allowed_hosts: Csv = ()
    public_metrics: Flag = False
    public_health: Flag = False
    max_body_bytes: Annotated[int | None, BeforeValidator(strip)] = None
    alert_backlog: Number = None
    alert_failures: Number = None
    alert_failures_window: Number = None
    alert_no_worker: Number = None
    alert_interval: Number = None
    alert_webhook: str | None = None
    alert_webhook_headers: Annotated[dict[str, str] | None, NoDecode, BeforeValidator(_json_object)] = None


@dataclass(frozen=True, slots=True)
class AdminOptions:
    """Tuning for the admin views. Every field has a safe default."""

    throughput_minutes: int = 30
    """How many minutes of per-minute completions the sparkline and API show."""
    run_window_seconds: float = 3600.0
    """Completions within this window feed the average and p95 run time."""
    worker_stale_seconds: float = 60.0
    """A worker whose heartbeat is older than this is shown as not alive."""
    page_size: int = 50
    """Jobs per page in the dashboard (the API takes ``limit``)."""
    db_timeout: float = 5.0
    """Seconds to wait for a pooled connection before answering 503."""
    metrics_lag_seconds: float = 5.0
    """Counters count rows finished up to this long ago, so commits in flight are not missed."""
    public_health: bool = False
    """Serve /health/detailed without credentials (live and ready are always public)."""
    public_metrics: bool = False
    """Serve /metrics without credentials (e.g. a Prometheus on a private network)."""
    refresh_seconds: float = 5.0
    """Dashboard auto-refresh period."""
    clean_batch: int = 5000
    """Rows deleted per statement by "clean", so a big clean never holds long locks."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted (413 beyond); the admin's own bodies are a few hundred
    bytes, so anything near this is not an operator."""

    def __post_init__(self) -> None:
        if not 1 <= self.throughput_minutes <= 1440:
            raise ConfigurationError("throughput_minutes must be within 1..1440")
        if not 1 <= self.page_size <= 500:
            raise ConfigurationError("page_size must be within 1..500")
        for name in ("run_window_seconds", "worker_stale_seconds", "db_timeout", "refresh_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.metrics_lag_seconds < 0:
            raise ConfigurationError("metrics_lag_seconds must not be negative")
        if self.clean_batch < 1:
            raise ConfigurationError("clean_batch must be at least 1")
        if isinstance(self.max_body_bytes, bool) or not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ConfigurationError("max_body_bytes must be within 1024..1073741824")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> AdminOptions:
        """Defaults, overlaid by ``PGQUEUE_ADMIN_PUBLIC_METRICS``, ``PGQUEUE_ADMIN_PUBLIC_HEALTH``
        and ``PGQUEUE_ADMIN_MAX_BODY_BYTES`` (read now), overlaid by non-None ``overrides``."""
        env = AdminEnv.load(environ, only=("public_metrics", "public_health", "max_body_bytes"))
        values: dict[str, Any] = {"public_metrics": env.public_metrics, "public_health": env.public_health}
        if env.max_body_bytes is not None:
            values["max_body_bytes"] = env.max_body_bytes
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
