"""How the admin app measures and shows things: windows, page sizes, what is public.

Kept apart from credentials (:mod:`pgqueue.admin.auth`) and alert rules
(:mod:`pgqueue.admin.alerts`) so each can be built, tested and read from the environment alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgqueue.errors import ConfigurationError

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


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
