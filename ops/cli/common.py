"""What every command shares: settings, the Redis client and services, the history database,
readable times."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
import redis
from sqlalchemy import make_url
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from rilla_bridge.clock import SystemClock
from rilla_bridge.lifecycle import Lifecycle, make_lifecycle
from rilla_bridge.observability import redact_text, register_secrets
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.redis_conn import make_redis
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import ConfigError, Settings, mask_url
from rilla_bridge.tenant_config import REPORT_STALE_SECONDS, TenantsConfig, load_config
from rilla_bridge.tenants import Tenant


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def tenants_config(s: Settings) -> TenantsConfig:
    """The tenants configuration as the processes read it (TENANTS_TOML or TENANTS_FILE)."""
    try:
        config = load_config(s)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    register_secrets(sec for t in config.tenants.values() for sec in t.secrets())
    return config


def tenants(s: Settings) -> Mapping[str, Tenant]:
    return tenants_config(s).tenants


def register_tenant_secrets(s: Settings) -> None:
    """Mask the tenants' secrets in what we print (a broken tenants file masks nothing)."""
    try:
        loaded = load_config(s).tenants
    except ConfigError:
        return
    register_secrets(sec for t in loaded.values() for sec in t.secrets())


def client(s: Settings) -> redis.Redis:
    return make_redis(s)


def lifecycle(s: Settings, c: redis.Redis) -> Lifecycle:
    return make_lifecycle(c, SystemClock(), s, tenants(s))


def guard(s: Settings, c: redis.Redis) -> QuotaGuard:
    return QuotaGuard.from_settings(s, c, Scripts(c), SystemClock())


def when(ts: Any) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``-``."""
    if ts in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the history database -------------------------------------------------------------------
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float | None = None) -> float:
    """``--since``/``--until``: an ISO date or datetime (UTC unless it has an offset), or an
    age such as ``90m``, ``6h``, ``2d`` (that long before now); epoch seconds."""
    m = _RELATIVE.match(text.strip().lower())
    if m:
        base = time.time() if now is None else now
        return base - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO date/datetime or an age like 6h or 2d") from None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@contextmanager
def history(s: Settings) -> Iterator[Connection]:
    """A read transaction on the history database (timeouts as the console's), or a clear
    error naming the database (password masked)."""
    from sqlalchemy.exc import SQLAlchemyError

    from rilla_bridge.history.db import make_engine, reading

    where = s.database_url_masked
    path = s.database_url.removeprefix("sqlite:///")
    if s.database_url.startswith("sqlite:///") and not os.path.exists(path):
        raise click.ClickException(f"no history database at {where} (run `rilla-bridge db "
                                   "upgrade` and the history process, or set DATABASE_URL)")
    engine = make_engine(s, poolclass=NullPool)
    try:
        with reading(engine) as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read the history database {where}: "
                                   f"{db_error(s, exc)}") from None
    finally:
        engine.dispose()


def db_error(s: Settings, exc: BaseException) -> str:
    """An error's class and first line, with the database password masked."""
    orig = getattr(exc, "orig", None) or exc
    text = (str(orig).strip().splitlines() or [""])[0][:300]
    password = make_url(s.database_url).password
    if password:
        text = text.replace(str(password), "***")
    return redact_text(f"{type(orig).__name__}: {text}")


def actor() -> str:
    """Who acts, for the audit log: ``RILLA_BRIDGE_OPERATOR`` or the login name."""
    import getpass

    return os.environ.get("RILLA_BRIDGE_OPERATOR") or f"cli:{getpass.getuser()}"


# -- the configuration each process runs ---------------------------------------------------
def running_versions(s: Settings, now: float | None = None) -> list[dict[str, Any]] | None:
    """What every live process reports running (None: Redis did not answer)."""
    from rilla_bridge.tenant_config import process_versions

    try:
        return process_versions(client(s), time.time() if now is None else now)
    except redis.RedisError:
        return None


def print_process_versions(s: Settings, version: str) -> None:
    rows = running_versions(s)
    where = mask_url(s.redis_url)
    if rows is None:
        click.echo(f"running processes: unknown (no answer from Redis at {where})")
        return
    if not rows:
        click.echo(f"running processes: none has reported in the last "
                   f"{REPORT_STALE_SECONDS:.0f} s (Redis at {where})")
        return
    old = [r for r in rows if r["version"] != version]
    click.echo(f"running processes ({len(rows)}, Redis at {where}): "
               + (f"{len(old)} run another version" if old else "all run this version"))
    click.echo(f"  {'PROCESS':<10} {'HOST':<24} {'PID':>7}  {'VERSION':<12}  SINCE")
    for r in rows:
        note = "" if r["version"] == version else "  <- not this version"
        if r.get("refused_version"):
            note += f"  (refused {r['refused_version']}: {r.get('refused_reason', '')})"
        click.echo(f"  {r['process']:<10} {str(r['host'])[:24]:<24} {r['pid']:>7}  "
                   f"{r['version']:<12}  {when(r['at'])}{note}")
