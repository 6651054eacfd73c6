"""``rilla-bridge dlq``: inspect, replay and delete dead letters."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ops.cli import common, main
from rilla_bridge.dlq import DeadLetters, Selector
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.observability import redact_text
from rilla_bridge.settings import Settings


@main.group()
def dlq() -> None:
    """Inspect, replay and delete dead letters."""


def _selectors(f: Any) -> Any:
    f = click.option("--reason", help="reason code or text fragment")(f)
    f = click.option("--source", type=click.Choice(["callrail", "callingly"]))(f)
    return click.option("--tenant", help="tenant slug")(f)


def _services(settings: Settings) -> tuple[DeadLetters, Lifecycle]:
    client = common.client(settings)
    lifecycle = common.lifecycle(settings, client)
    return lifecycle.dlq, lifecycle


@dlq.command("list")
@_selectors
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
def dlq_list(tenant: str | None, source: str | None, reason: str | None, as_json: bool) -> None:
    """List dead letters, oldest failure first."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    dead, _ = _services(settings)
    rows = list(dead.iter(Selector(tenant, source, reason)))
    if as_json:
        click.echo(redact_text(json.dumps(rows, indent=2)))
        return
    if not rows:
        click.echo("no dead letters" + (" match" if tenant or source or reason else ""))
        return
    click.echo(f"{'ID':<34} {'TENANT':<18} {'SOURCE':<9} {'STATUS':<6} {'ATT':>3}  "
               f"{'FAILED AT (UTC)':<19}  REASON")
    for r in rows:
        click.echo(redact_text(
            f"{r['id']:<34} {r['tenant'][:18]:<18} {r['source']:<9} "
            f"{r['status_code'] if r['status_code'] is not None else '-':<6} "
            f"{r['attempts']:>3}  {common.when(r['failed_at']):<19}  {r['reason'][:100]}"))
    click.echo(f"{len(rows)} dead letter(s)")


@dlq.command("show")
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(dead_letter_id: str, as_json: bool) -> None:
    """Everything kept about one dead letter (raw event, last payload, Rilla's answer)."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    dead, _ = _services(settings)
    entry = dead.get(dead_letter_id)
    if entry is None:
        raise click.ClickException(f"no dead letter {dead_letter_id}")
    body = entry.pop("body", b"")
    try:
        entry["raw_event"] = json.loads(body) if body else None
    except ValueError:
        entry["raw_event"] = body.decode("utf-8", "replace")
    entry["payload"] = json.loads(entry["payload"]) if entry.get("payload") else None
    text = json.dumps(entry, indent=2, default=str)
    if not as_json:
        text = "\n".join(line for line in text.splitlines())
    click.echo(redact_text(text))


def _select_ids(dl: DeadLetters, ids: tuple[str, ...], all_: bool, sel: Selector) -> list[str]:
    if ids and all_:
        raise click.UsageError("give IDs or --all, not both")
    if not ids and not all_:
        raise click.UsageError("give one or more IDs, or --all (with optional filters)")
    if ids:
        out = []
        for i in ids:
            entry = dl.get(i)
            if entry is None:
                click.echo(f"{i}: not in the dead-letter store (replayed or deleted already?)",
                           err=True)
            elif sel.matches(entry):
                out.append(i)
        return out
    return [r["id"] for r in dl.iter(sel)]


def _bulk(action: str, ids: list[str], fn: Any, dry_run: bool) -> None:
    stem = action[:-1] if action.endswith("e") else action  # delete -> deleted, deleting
    if dry_run:
        for i in ids:
            click.echo(f"would {action} {i}")
        click.echo(f"dry run: {len(ids)} dead letter(s) would be {stem}ed")
        return
    done = 0
    with click.progressbar(ids, label=f"{stem}ing", file=sys.stderr,
                           show_pos=True) as bar:
        for i in bar:
            done += 1 if fn(i) else 0
    click.echo(f"{stem}ed {done} of {len(ids)} dead letter(s)")


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter matching the filters")
@_selectors
@click.option("--dry-run", is_flag=True, help="only list what would be replayed")
def dlq_replay(ids: tuple[str, ...], all_: bool, tenant: str | None, source: str | None,
               reason: str | None, dry_run: bool) -> None:
    """Re-run dead letters from their raw events through the normal pipeline."""
    dead, lifecycle = _services(common.settings())
    chosen = _select_ids(dead, ids, all_, Selector(tenant, source, reason))
    _bulk("replay", chosen, lifecycle.replay, dry_run)


@dlq.command("delete")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter matching the filters")
@_selectors
@click.option("--dry-run", is_flag=True, help="only list what would be deleted")
def dlq_delete(ids: tuple[str, ...], all_: bool, tenant: str | None, source: str | None,
               reason: str | None, dry_run: bool) -> None:
    """Delete dead letters for good."""
    dead, _ = _services(common.settings())
    chosen = _select_ids(dead, ids, all_, Selector(tenant, source, reason))
    _bulk("delete", chosen, dead.delete, dry_run)
