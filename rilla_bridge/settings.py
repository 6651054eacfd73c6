"""Every environment variable of rilla-bridge's own, in one place, one line each.

Other modules receive a ``Settings`` object. The only other reads of the environment are the
variables that belong to a library's own convention and are read where that library expects
them: ``PROMETHEUS_MULTIPROC_DIR`` (the web server's launcher, ``ops/web.py``),
``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` and the proxy variables (``rilla_bridge.http``),
and the ``${NAME}`` references of the tenants file (``rilla_bridge.tenants``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TypeVar


class ConfigError(Exception):
    """A setting or the tenants file is wrong; the message says which and why."""


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N], what: str) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return _number(env, name, default, int, "an integer")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number")


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


@dataclass(frozen=True)
class Settings:
    # -- SPEC names (fixed) --------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    rilla_base_url: str = "https://api.apirilla.com"
    callrail_base_url: str = "https://api.callrail.com"
    tenants_file: str = "tenants.toml"
    admin_token: str = ""
    sentry_dsn: str = ""
    port: int = 8000
    web_concurrency: int = 2   # granian worker processes (Heroku sets WEB_CONCURRENCY)
    retry_base_seconds: float = 5.0
    retry_max_delay_seconds: float = 3600.0
    retry_max_age_seconds: float = 86400.0
    callrail_hourly_limit: int = 1000
    callrail_daily_limit: int = 10000
    # -- our own (documented in the README) -----------------------------------
    redis_tls_cert_reqs: str = "required"  # required | optional | none (Heroku: none)
    dedup_window_seconds: int = 86400
    event_retention_seconds: int = 7 * 86400
    max_body_bytes: int = 1024 * 1024
    # The web's deadline for a client's request headers, and then again for its body.
    web_read_timeout_seconds: float = 10.0
    environment: str = "production"   # Sentry's environment tag
    # Celery/kombu: a message not acked this long after a worker took it is handed out again.
    visibility_timeout_seconds: int = 60
    # Events still pending this long (nothing finished them) are enqueued again by the scheduler.
    stale_pending_seconds: int = 90
    rilla_connect_timeout: float = 3.05
    rilla_read_timeout: float = 20.0
    # At most this many deliveries of one tenant in flight at once, across all workers.
    tenant_max_inflight: int = 128
    # CallRail API timeouts (seconds): one request per quota token, so a hung one is a retry.
    callrail_connect_timeout: float = 3.05
    callrail_read_timeout: float = 20.0
    # Quota window lengths. CallRail's are an hour and a day; integration tests and the quota
    # benchmark shrink them to see windows roll in seconds. Never change them in production.
    callrail_hour_seconds: int = 3600
    callrail_day_seconds: int = 86400
    callrail_pause_base_seconds: float = 60.0
    reconcile_budget_share: float = 0.2
    backfill_budget_share: float = 0.5
    reconcile_interval_seconds: int = 900
    reconcile_lookback_seconds: int = 2 * 86400
    # Calls younger than this are left to their webhook (post-call fires up to 20 min late).
    reconcile_settle_seconds: int = 1800

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        s = cls(
            redis_url=_str(e, "REDIS_URL", cls.redis_url),
            rilla_base_url=_str(e, "RILLA_BASE_URL", cls.rilla_base_url).rstrip("/"),
            callrail_base_url=_str(e, "CALLRAIL_BASE_URL", cls.callrail_base_url).rstrip("/"),
            tenants_file=_str(e, "TENANTS_FILE", cls.tenants_file),
            admin_token=e.get("ADMIN_TOKEN", ""),
            sentry_dsn=e.get("SENTRY_DSN", "").strip(),
            port=_int(e, "PORT", cls.port),
            web_concurrency=_int(e, "WEB_CONCURRENCY", cls.web_concurrency),
            retry_base_seconds=_float(e, "RETRY_BASE_SECONDS", cls.retry_base_seconds),
            retry_max_delay_seconds=_float(
                e, "RETRY_MAX_DELAY_SECONDS", cls.retry_max_delay_seconds
            ),
            retry_max_age_seconds=_float(e, "RETRY_MAX_AGE_SECONDS", cls.retry_max_age_seconds),
            callrail_hourly_limit=_int(e, "CALLRAIL_HOURLY_LIMIT", cls.callrail_hourly_limit),
            callrail_daily_limit=_int(e, "CALLRAIL_DAILY_LIMIT", cls.callrail_daily_limit),
            redis_tls_cert_reqs=_str(e, "REDIS_TLS_CERT_REQS", cls.redis_tls_cert_reqs).lower(),
            dedup_window_seconds=_int(e, "DEDUP_WINDOW_SECONDS", cls.dedup_window_seconds),
            event_retention_seconds=_int(
                e, "EVENT_RETENTION_SECONDS", cls.event_retention_seconds
            ),
            max_body_bytes=cls.max_body_bytes,
            web_read_timeout_seconds=_float(
                e, "WEB_READ_TIMEOUT_SECONDS", cls.web_read_timeout_seconds),
            environment=_str(e, "ENVIRONMENT", cls.environment),
            visibility_timeout_seconds=_int(
                e, "VISIBILITY_TIMEOUT_SECONDS", cls.visibility_timeout_seconds
            ),
            stale_pending_seconds=_int(e, "STALE_PENDING_SECONDS", cls.stale_pending_seconds),
            rilla_connect_timeout=_float(e, "RILLA_CONNECT_TIMEOUT", cls.rilla_connect_timeout),
            rilla_read_timeout=_float(e, "RILLA_READ_TIMEOUT", cls.rilla_read_timeout),
            tenant_max_inflight=_int(e, "TENANT_MAX_INFLIGHT", cls.tenant_max_inflight),
            callrail_connect_timeout=_float(
                e, "CALLRAIL_CONNECT_TIMEOUT", cls.callrail_connect_timeout),
            callrail_read_timeout=_float(e, "CALLRAIL_READ_TIMEOUT", cls.callrail_read_timeout),
            callrail_hour_seconds=_int(e, "CALLRAIL_HOUR_SECONDS", cls.callrail_hour_seconds),
            callrail_day_seconds=_int(e, "CALLRAIL_DAY_SECONDS", cls.callrail_day_seconds),
            callrail_pause_base_seconds=_float(
                e, "CALLRAIL_PAUSE_BASE_SECONDS", cls.callrail_pause_base_seconds
            ),
            reconcile_budget_share=_float(
                e, "RECONCILE_BUDGET_SHARE", cls.reconcile_budget_share
            ),
            backfill_budget_share=_float(e, "BACKFILL_BUDGET_SHARE", cls.backfill_budget_share),
            reconcile_interval_seconds=_int(
                e, "RECONCILE_INTERVAL_SECONDS", cls.reconcile_interval_seconds
            ),
            reconcile_lookback_seconds=_int(
                e, "RECONCILE_LOOKBACK_SECONDS", cls.reconcile_lookback_seconds
            ),
            reconcile_settle_seconds=_int(
                e, "RECONCILE_SETTLE_SECONDS", cls.reconcile_settle_seconds
            ),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
        if self.redis_tls_cert_reqs not in ("required", "optional", "none"):
            raise ConfigError("REDIS_TLS_CERT_REQS must be required, optional or none")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"{f.name.upper()} must not be negative")
        if self.web_concurrency < 1 or not 0 < self.web_read_timeout_seconds <= 60:
            raise ConfigError("WEB_CONCURRENCY must be at least 1 and WEB_READ_TIMEOUT_SECONDS "
                              "between 0 and 60")
        if self.retry_base_seconds <= 0:
            raise ConfigError("RETRY_BASE_SECONDS must be positive")
        if not 0 < self.reconcile_budget_share <= 1 or not 0 < self.backfill_budget_share <= 1:
            raise ConfigError("budget shares must be between 0 and 1")
