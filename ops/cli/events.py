"""``rilla-bridge events``: received events and their timelines, from the history database."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import redis

from ops.cli import common, main
from rilla_bridge.history import queries
from rilla_bridge.observability import redact_text
from rilla_bridge.providers import SOURCES
from rilla_bridge.settings import Settings, mask_url

HIDDEN = ("body", "last_payload")   # raw bodies and payloads: `dlq show` prints them


@main.group()
def events() -> None:
    """Received events and their timelines."""


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def events_show(event_id: str, as_json: bool) -> None:
    """Print one event's record and whole timeline."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    with common.history(settings) as conn:
        found = queries.event(conn, event_id)
    if found is None:
        raise click.ClickException(_not_found(settings, event_id))
    event = {k: v for k, v in found["event"].items() if k not in HIDDEN}
    if as_json:
        out = {"event": event, "timeline": found["timeline"],
               "dead_letters": found["dead_letters"], "same_call": found["same_call"]}
        click.echo(redact_text(json.dumps(out, indent=2, default=str)))
        return
    click.echo(f"{event_id}  {event.get('source')}/{event.get('tenant')}  kind "
               f"{event.get('kind')}  call {event.get('call_id') or '-'}")
    click.echo(f"status: {event.get('status')}" + (f" ({event['reason']})"
                                                   if event.get("reason") else ""))
    click.echo(f"  {common.when(event.get('received_at'))}  received ({event.get('size')} bytes)")
    for entry in found["timeline"]:
        details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("t", "what"))
        click.echo(redact_text(f"  {common.when(entry.get('t'))}  {entry.get('what')}"
                               + (f"  {details}" if details else "")))
    for dl in found["dead_letters"]:
        state = (f"handled ({dl['handled_how']}) {common.when(dl['handled_at'])}"
                 if dl.get("handled_at") else "open")
        click.echo(redact_text(f"dead letter {common.when(dl['failed_at'])}: {state}, "
                               f"{dl['reason_code']}: {dl['reason'][:200]}"))
    if found["same_call"]:
        click.echo(f"same call ({event.get('event_id')}):")
        for other in found["same_call"]:
            click.echo(f"  {other['id']}  {common.when(other['received_at'])}  "
                       f"{other['kind']}  {other['status']}")


@events.command("list")
@click.option("--tenant", help="tenant slug")
@click.option("--source", type=click.Choice(list(SOURCES)))
@click.option("--status", help="queued, delivered, skipped, dead, retry_scheduled, ...")
@click.option("--kind", help="event kind, e.g. post_call, call_completed")
@click.option("--since", help="received at or after: ISO date/datetime (UTC) or an age: 6h, 2d")
@click.option("--until", help="received before: same forms as --since")
@click.option("--phone", help="customer phone, any format (compared in E.164)")
@click.option("--name", help="part of the customer's name (without --since: the last "
                             f"{queries.NAME_SEARCH_DAYS} days)")
@click.option("--call-id", help="the provider's call id, or our callrail-<id> / callingly-<id>")
@click.option("--rep", help="the Rilla rep's email")
@click.option("--limit", type=click.IntRange(1, queries.MAX_LIMIT), default=50, show_default=True)
@click.option("--before", help="cursor printed at the end of the previous page")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
def events_list(tenant: str | None, source: str | None, status: str | None, kind: str | None,
                since: str | None, until: str | None, phone: str | None, name: str | None,
                call_id: str | None, rep: str | None, limit: int, before: str | None,
                as_json: bool) -> None:
    """List events, newest first."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    now = time.time()
    f = queries.EventFilter(
        tenant=tenant, source=source, status=status, kind=kind,
        since=common.parse_time(since, now) if since else None,
        until=common.parse_time(until, now) if until else None,
        phone=phone, name=name, rep_email=rep, call_id=call_id)
    with common.history(settings) as conn:
        try:
            page = queries.events_page(conn, f, limit=limit, before=before, now=now)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--before") from None
    if as_json:
        click.echo(redact_text(json.dumps(page.rows, indent=2)))
        return
    if not page.rows:
        click.echo(f"no events match (searched {settings.database_url_masked})")
        return
    click.echo(f"{'ID':<34} {'RECEIVED (UTC)':<19}  {'TENANT':<18} {'SOURCE':<9} "
               f"{'KIND':<22} {'STATUS':<17} CALL")
    for r in page.rows:
        click.echo(redact_text(_line(r)))
    click.echo(f"{len(page.rows)} event(s), newest first"
               + (f"; older: --before {page.next}" if page.next else ""))


def _line(r: dict[str, Any]) -> str:
    return (f"{r['id']:<34} {common.when(r['received_at']):<19}  {(r['tenant'] or '')[:18]:<18} "
            f"{r['source'] or '':<9} {(r['kind'] or '')[:22]:<22} {r['status'] or '':<17} "
            f"{r['call_id'] or '-'}")


def _not_found(settings: Settings, event_id: str) -> str:
    """Where ``events show`` looked, so a wrong REDIS_URL or DATABASE_URL shows: the history
    database, then Redis (an event in progress whose history is not written yet)."""
    from sqlalchemy.pool import NullPool

    from rilla_bridge.events import EventStore
    from rilla_bridge.history.db import describe, make_engine

    engine = make_engine(settings, poolclass=NullPool)
    database = describe(engine)
    engine.dispose()
    redis_at = mask_url(settings.redis_url)
    try:
        live = EventStore(common.client(settings)).get(event_id)
    except redis.RedisError as exc:
        return (f"no event {event_id} in the history database {database}, and Redis at "
                f"{redis_at} did not answer ({type(exc).__name__}); check DATABASE_URL and "
                "REDIS_URL")
    if live is not None:
        return (f"event {event_id} is not in the history database {database} yet, but in "
                f"progress in Redis at {redis_at}: status {live.get('status') or 'queued'}, "
                f"tenant {live.get('tenant')}, {live.get('attempts') or 0} attempt(s); is the "
                "history process running (`rilla-bridge history`)?")
    return (f"no event {event_id}: looked in the history database {database} and in Redis at "
            f"{redis_at} (events in progress); unknown there, or past its retention. Wrong "
            "DATABASE_URL or REDIS_URL?")
