"""Every environment variable of rilla-bridge's own, in one place, one line each.

Other modules receive a ``Settings`` object. The only other reads of the environment are the
variables that belong to a library's own convention and are read where that library expects
them: ``PROMETHEUS_MULTIPROC_DIR`` (the web server's launcher, ``ops/web.py``),
``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` and the proxy variables (``rilla_bridge.http``),
and the ``${NAME}`` references of the tenants file (``rilla_bridge.tenants``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit


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


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true or false), got {raw!r}")


# Not a setting: ``rilla-bridge web`` tells its workers where its operator process listens.
OPERATOR_SOCKET_ENV = "RB_OPERATOR_SOCKET"
DEFAULT_DATABASE_URL = "sqlite:///rilla-bridge.db"   # a file in the working directory
_PG_SCHEMES = ("postgres://", "postgresql://", "postgresql+psycopg://")


def database_url(raw: str) -> str:
    """``DATABASE_URL`` as SQLAlchemy takes it: Heroku's ``postgres://`` and plain
    ``postgresql://`` use the psycopg 3 driver; ``sqlite:///path`` is kept; unset = SQLite."""
    raw = raw.strip()
    if not raw:
        return DEFAULT_DATABASE_URL
    if raw.startswith(_PG_SCHEMES):
        return "postgresql+psycopg://" + raw.split("://", 1)[1]
    if raw.startswith("sqlite:///"):
        return raw
    scheme = raw.split("://", 1)[0] if "://" in raw else raw[:12]
    raise ConfigError(f"DATABASE_URL must start with postgres://, postgresql:// or sqlite:///, "
                      f"got {scheme!r}")


_QUERY_PASSWORD = re.compile(r"(password=)[^&]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """A database URL for messages: the password (in the user part or a ``password=``
    parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    elif not (at or "password=" in parts.query.lower()):
        return url   # nothing secret (and urlunsplit would drop sqlite:///'s empty host)
    return urlunsplit(parts._replace(query=_QUERY_PASSWORD.sub(r"\1***", parts.query)))


@dataclass(frozen=True)
class Settings:
    # -- SPEC names (fixed) --------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    rilla_base_url: str = "https://api.apirilla.com"
    callrail_base_url: str = "https://api.callrail.com"
    tenants_file: str = "tenants.toml"
    # TENANTS_TOML: the tenants file's content itself (wins over TENANTS_FILE); never printed.
    tenants_toml: str = field(default="", repr=False)
    tenants_file_set: bool = False   # TENANTS_FILE given explicitly (not the default)
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
    max_body_bytes: int = 1024 * 1024
    # The web's deadline for a client's request headers, and then again for its body.
    web_read_timeout_seconds: float = 10.0
    # Failed signatures or tokens one client address may send in a minute; beyond, its
    # failures are answered 429 with Retry-After (valid webhooks are never held back). 0: off.
    auth_failures_per_minute: int = 20
    # The client address is the last X-Forwarded-For entry (the one Heroku's router adds)
    # instead of the connection's peer: set it only behind a proxy that adds that header.
    trust_forwarded_for: bool = False
    environment: str = "production"   # Sentry's environment tag
    # Celery/kombu: a message not acked this long after a worker took it is handed out again.
    visibility_timeout_seconds: int = 60
    rilla_connect_timeout: float = 3.05
    rilla_read_timeout: float = 20.0
    # At most this many deliveries of one tenant in flight at once, across all workers (a
    # tenant's own ``max_inflight`` in the tenants file wins).
    tenant_max_inflight: int = 128
    # Each tenant's intake limit (a tenant's own in the tenants file wins): events per second
    # (with two seconds of burst) and body MiB per minute; over it a webhook gets 429.
    tenant_intake_per_second: float = 200.0
    tenant_intake_mib_per_minute: float = 64.0
    # Dispatched events waiting in Celery's queue at most; beyond, tenants wait their turn in
    # their lanes (fair between tenants). About the worker slots of one or two processes.
    dispatch_queue_max: int = 400
    # A running delivery holds its slot and its call's lock under this lease, renewed by the
    # worker's heartbeat: a dead worker's work is back in progress within about a lease.
    delivery_lease_seconds: float = 8.0
    # A worker given SIGTERM finishes what it runs for at most this long, then hands the rest
    # back to their lanes and exits (Heroku's SIGKILL follows SIGTERM after 30 s).
    worker_shutdown_grace_seconds: float = 20.0
    # Replays and backfill leave their bulk lanes at most this fast (events/s, all tenants).
    bulk_rate_per_second: float = 50.0
    # Calls whose state went to history in one generation (the history retention): sizes the
    # Bloom filter that tells a late event to reload its call (about 1.2 bytes per call).
    seen_calls_capacity: int = 300_000
    # CallRail API timeouts (seconds): one request per quota token, so a hung one is a retry.
    callrail_connect_timeout: float = 3.05
    callrail_read_timeout: float = 20.0
    # Quota window lengths. CallRail's are an hour and a day; integration tests and the quota
    # benchmark shrink them to see windows roll in seconds. Never change them in production.
    callrail_hour_seconds: int = 3600
    callrail_day_seconds: int = 86400
    callrail_pause_base_seconds: float = 60.0
    # Most of a CallRail account's hourly budget one tenant's recording lookups may use (when
    # several tenants share an account, one of them cannot spend it all).
    callrail_tenant_lookup_share: float = 0.5
    reconcile_budget_share: float = 0.2
    backfill_budget_share: float = 0.5
    reconcile_interval_seconds: int = 900
    reconcile_lookback_seconds: int = 2 * 86400
    # Calls younger than this are left to their webhook (post-call fires up to 20 min late).
    reconcile_settle_seconds: int = 1800
    # History database (SQLAlchemy URL, see ``database_url``); never printed: use ``mask_url``.
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    history_retention_days: int = 30
    history_batch: int = 500   # stream entries the history process writes per transaction
    # This service's public address (https://<app>.herokuapp.com): the webhook URLs the
    # console and ``tenants urls`` print. Unset: the console uses the address it was reached at.
    public_url: str = ""

    @property
    def database_url_masked(self) -> str:
        """``database_url`` safe for messages and logs (no password)."""
        return mask_url(self.database_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        s = cls(
            redis_url=_str(e, "REDIS_URL", cls.redis_url),
            rilla_base_url=_str(e, "RILLA_BASE_URL", cls.rilla_base_url).rstrip("/"),
            callrail_base_url=_str(e, "CALLRAIL_BASE_URL", cls.callrail_base_url).rstrip("/"),
            tenants_file=_str(e, "TENANTS_FILE", cls.tenants_file),
            tenants_toml=e.get("TENANTS_TOML", ""),
            tenants_file_set=bool(e.get("TENANTS_FILE", "").strip()),
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
            max_body_bytes=cls.max_body_bytes,
            web_read_timeout_seconds=_float(
                e, "WEB_READ_TIMEOUT_SECONDS", cls.web_read_timeout_seconds),
            auth_failures_per_minute=_int(
                e, "AUTH_FAILURES_PER_MINUTE", cls.auth_failures_per_minute),
            trust_forwarded_for=_bool(e, "TRUST_FORWARDED_FOR", cls.trust_forwarded_for),
            environment=_str(e, "ENVIRONMENT", cls.environment),
            visibility_timeout_seconds=_int(
                e, "VISIBILITY_TIMEOUT_SECONDS", cls.visibility_timeout_seconds
            ),
            rilla_connect_timeout=_float(e, "RILLA_CONNECT_TIMEOUT", cls.rilla_connect_timeout),
            rilla_read_timeout=_float(e, "RILLA_READ_TIMEOUT", cls.rilla_read_timeout),
            tenant_max_inflight=_int(e, "TENANT_MAX_INFLIGHT", cls.tenant_max_inflight),
            dispatch_queue_max=_int(e, "DISPATCH_QUEUE_MAX", cls.dispatch_queue_max),
            tenant_intake_per_second=_float(
                e, "TENANT_INTAKE_PER_SECOND", cls.tenant_intake_per_second),
            tenant_intake_mib_per_minute=_float(
                e, "TENANT_INTAKE_MIB_PER_MINUTE", cls.tenant_intake_mib_per_minute),
            delivery_lease_seconds=_float(
                e, "DELIVERY_LEASE_SECONDS", cls.delivery_lease_seconds),
            worker_shutdown_grace_seconds=_float(
                e, "WORKER_SHUTDOWN_GRACE_SECONDS", cls.worker_shutdown_grace_seconds),
            bulk_rate_per_second=_float(e, "BULK_RATE_PER_SECOND", cls.bulk_rate_per_second),
            seen_calls_capacity=_int(e, "SEEN_CALLS_CAPACITY", cls.seen_calls_capacity),
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
            callrail_tenant_lookup_share=_float(
                e, "CALLRAIL_TENANT_LOOKUP_SHARE", cls.callrail_tenant_lookup_share),
            reconcile_interval_seconds=_int(
                e, "RECONCILE_INTERVAL_SECONDS", cls.reconcile_interval_seconds
            ),
            reconcile_lookback_seconds=_int(
                e, "RECONCILE_LOOKBACK_SECONDS", cls.reconcile_lookback_seconds
            ),
            reconcile_settle_seconds=_int(
                e, "RECONCILE_SETTLE_SECONDS", cls.reconcile_settle_seconds
            ),
            database_url=database_url(e.get("DATABASE_URL", "")),
            history_retention_days=_int(e, "HISTORY_RETENTION_DAYS", cls.history_retention_days),
            history_batch=_int(e, "HISTORY_BATCH", cls.history_batch),
            public_url=_str(e, "PUBLIC_URL", cls.public_url).rstrip("/"),
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
        if self.history_retention_days < 1 or self.history_batch < 1:
            raise ConfigError("HISTORY_RETENTION_DAYS and HISTORY_BATCH must be at least 1")
