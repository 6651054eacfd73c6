"""``rilla-bridge tenants purge T``: offboarding a client, everything stored about it removed
(kept apart from ``ops/cli/tenants.py`` so each file stays about one thing)."""

from __future__ import annotations

import click

from ops.cli import common
from ops.cli.tenants import tenants
from rilla_bridge.clock import SystemClock
from rilla_bridge.operations import Operations

LABELS = {
    "redis_events": "events in progress in Redis (raw bodies)",
    "redis_keys": "lanes, retry sets, slots, intake buckets (Redis keys)",
    "call_states": "call states and call locks (Redis keys)",
    "dedup_keys": "dedup keys of recent bodies (Redis keys)",
    "sql_events": "events in history (with raw bodies and payloads)",
    "timeline": "timeline entries in history",
    "dead_letters": "dead letters in history (open or handled)",
    "calls": "call states in history",
}


@tenants.command("purge")
@click.argument("slug")
@click.option("--dry-run", is_flag=True, help="only count what would be removed")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def tenants_purge(slug: str, dry_run: bool, yes: bool) -> None:
    """Remove everything stored about tenant SLUG (offboarding): its work in Redis, raw
    events, call states, dedup keys, and its history (events, timelines, dead letters,
    calls). Remove it from the tenants file first. Audit-logged; cannot be undone."""
    from rilla_bridge.history.db import make_engine

    settings = common.settings()
    config = common.tenants_config(settings)
    if slug in config.tenants and not dry_run:
        raise click.ClickException(
            f"tenant {slug!r} is still in {config.source}: remove it there first (its "
            "webhooks would keep arriving), wait until `rilla-bridge tenants check` shows "
            "every process on the new version, then purge")
    ops = Operations(settings, common.client(settings), make_engine(settings), SystemClock(),
                     config.tenants)
    counts = ops.purge(slug, common.actor(), dry_run=True)
    click.echo(f"tenant {slug}: " + ("would remove" if dry_run else "stored now"))
    for key, label in LABELS.items():
        click.echo(f"  {counts.get(key, 0):>9}  {label}")
    if dry_run:
        click.echo("dry run: nothing removed")
        return
    if not any(counts.values()):
        click.echo(f"nothing stored about {slug}")
        return
    if not yes and not click.confirm(f"remove all of it for good (type y to purge {slug})?",
                                     default=False):
        raise click.ClickException("nothing removed")
    done = ops.purge(slug, common.actor())
    click.echo(f"purged {slug}: " + ", ".join(f"{done[k]} {k}" for k in LABELS if k in done)
               + " (the audit log records it)")
