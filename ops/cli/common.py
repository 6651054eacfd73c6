"""What every command shares: settings, the Redis client and services, readable times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import redis

from rilla_bridge.clock import SystemClock
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.observability import register_secrets
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.redis_conn import make_redis
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import ConfigError, Settings
from rilla_bridge.tenants import Tenant, load_tenants


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def tenants(s: Settings) -> dict[str, Tenant]:
    try:
        return load_tenants(s.tenants_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def register_tenant_secrets(s: Settings) -> None:
    """Mask the tenants' secrets in what we print (a broken tenants file masks nothing)."""
    try:
        loaded = load_tenants(s.tenants_file)
    except ConfigError:
        return
    register_secrets(sec for t in loaded.values() for sec in t.secrets())


def client(s: Settings) -> redis.Redis:
    return make_redis(s)


def lifecycle(s: Settings, c: redis.Redis) -> Lifecycle:
    return Lifecycle(c, Scripts(c), SystemClock(), s)


def guard(s: Settings, c: redis.Redis) -> QuotaGuard:
    return QuotaGuard.from_settings(s, c, Scripts(c), SystemClock())


def when(ts: Any) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``-``."""
    if ts in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
