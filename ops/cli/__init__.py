"""``rilla-bridge``: the operator's command line (SPEC "Operations").

One module per command group: ``tenants``, ``events``, ``dlq``, ``db`` (the history
database's schema), ``callrail`` (quota, backfill), ``retries`` and ``processes``
(scheduler, history, sandboxes, the local run).

No command ends in a traceback for a known failure: a configuration error, Redis or the
history database not answering is one line on stderr and exit status 1 (``_Main.invoke``).
"""

from __future__ import annotations

import os
from typing import Any

import click
import redis
from sqlalchemy.exc import SQLAlchemyError

from rilla_bridge.settings import ConfigError, mask_url


def _redis_where() -> str:
    return mask_url(os.environ.get("REDIS_URL", "").strip() or "redis://localhost:6379/0")


def _database_where() -> str:
    from rilla_bridge.settings import database_url

    try:
        return mask_url(database_url(os.environ.get("DATABASE_URL", "")))
    except ConfigError:
        return "DATABASE_URL"


def _database_password() -> str | None:
    from sqlalchemy import make_url

    try:
        password = make_url(os.environ.get("DATABASE_URL", "").strip() or "sqlite://").password
    except Exception:   # an unparseable URL: nothing to mask beyond what mask_url does
        return None
    return str(password) if password else None


class _Main(click.Group):
    """The command group whose known failures end in one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(f"configuration: {exc}") from None
        except redis.RedisError as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise click.ClickException(
                f"Redis at {_redis_where()} (REDIS_URL): {type(exc).__name__}: {first}"
            ) from None
        except SQLAlchemyError as exc:
            from rilla_bridge.observability import redact_text

            orig = getattr(exc, "orig", None) or exc
            first = (str(orig).strip().splitlines() or [""])[0][:300]
            password = _database_password()
            if password:
                first = first.replace(password, "***")
            raise click.ClickException(redact_text(
                f"history database {_database_where()} (DATABASE_URL): "
                f"{type(orig).__name__}: {first}")) from None


@click.group(cls=_Main)
def main() -> None:
    """rilla-bridge: CallRail and Callingly calls into Rilla."""


from ops.cli import (  # noqa: E402  (they register)
    callrail,
    db,
    dlq,
    events,
    processes,
    purge,
    retries,
    tenants,
)

__all__ = ["callrail", "db", "dlq", "events", "main", "processes", "purge", "retries",
           "tenants"]
