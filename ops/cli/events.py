"""``rilla-bridge events``: received events and their timelines."""

from __future__ import annotations

import json

import click

from ops.cli import common, main
from rilla_bridge.events import EventStore
from rilla_bridge.observability import redact_text


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
    store = EventStore(common.client(settings))
    event = store.get(event_id)
    if event is None:
        raise click.ClickException(f"no event {event_id} (unknown, or past its retention)")
    event.pop("body", None)
    event.pop("last_payload", None)
    timeline = store.timeline(event_id)
    if as_json:
        click.echo(redact_text(json.dumps({"event": event, "timeline": timeline}, indent=2)))
        return
    click.echo(f"{event_id}  {event.get('source')}/{event.get('tenant')}  kind "
               f"{event.get('kind')}  call {event.get('call_id') or '-'}")
    click.echo(f"status: {event.get('status')}" + (f" ({event['reason']})"
                                                   if event.get("reason") else ""))
    click.echo(f"  {common.when(event.get('received_at'))}  received ({event.get('size')} bytes)")
    for entry in timeline:
        details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("t", "what"))
        click.echo(redact_text(f"  {common.when(entry.get('t'))}  {entry.get('what')}"
                               + (f"  {details}" if details else "")))
