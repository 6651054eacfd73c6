"""``rilla-bridge retries``: deliveries waiting for their next attempt, and making them go now
(after an outage, instead of waiting out their backoff)."""

from __future__ import annotations

import json
import sys

import click

from ops.cli import common, main
from rilla_bridge.clock import SystemClock
from rilla_bridge.operations import Operations
from rilla_bridge.settings import Settings


@main.group()
def retries() -> None:
    """Deliveries waiting for their next attempt (Rilla answered 429/5xx or did not answer)."""


def _operations(settings: Settings) -> Operations:
    from rilla_bridge.history.db import make_engine

    return Operations(settings, common.client(settings), make_engine(settings), SystemClock(),
                      common.tenants(settings))


def _in(seconds: float) -> str:
    if seconds <= 0:
        return "due now"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"in {seconds / size:.1f}{unit}"
    return f"in {seconds:.0f}s"


@retries.command("list")
@click.option("--tenant", help="tenant slug")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
def retries_list(tenant: str | None, limit: int, as_json: bool) -> None:
    """Waiting retries, soonest due first: when, tenant, attempts so far."""
    settings = common.settings()
    ops = _operations(settings)
    rows = ops.retries(tenant, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no retries waiting" + (f" for {tenant}" if tenant else ""))
        return
    now = ops.clock.now()
    click.echo(f"{'ID':<34} {'TENANT':<18} {'LANE':<5} {'ATT':>3}  {'DUE (UTC)':<19}  "
               f"{'':<11} KIND")
    for r in rows:
        click.echo(f"{r['id']:<34} {r['tenant'][:18]:<18} {r['lane']:<5} {r['attempts']:>3}  "
                   f"{common.when(r['due_at']):<19}  {_in(r['due_at'] - now):<11} "
                   f"{r['source']}/{r['kind']}")
    click.echo(f"{len(rows)} retr{'y' if len(rows) == 1 else 'ies'} waiting"
               + (f" (the first {limit}; more with --limit)" if len(rows) == limit else ""))


@retries.command("now")
@click.option("--tenant", help="only this tenant's retries")
@click.option("--rate", type=click.FloatRange(min=0.1), default=None,
              help="retries put back per second at most (default BULK_RATE_PER_SECOND)")
@click.option("--yes", is_flag=True, help="do not ask first")
def retries_now(tenant: str | None, rate: float | None, yes: bool) -> None:
    """Put waiting retries back at the head of their lanes now (paced), e.g. once Rilla is
    back after an outage. Audit-logged."""
    settings = common.settings()
    ops = _operations(settings)
    waiting = ops.retries(tenant, limit=1_000_000)
    if not waiting:
        click.echo("no retries waiting" + (f" for {tenant}" if tenant else ""))
        return
    pace = rate or settings.bulk_rate_per_second
    click.echo(f"{len(waiting)} retr{'y' if len(waiting) == 1 else 'ies'} waiting"
               + (f" for {tenant}" if tenant else "")
               + f"; putting them back at {pace:g}/s (about {len(waiting) / pace:.0f} s)")
    if not yes and not click.confirm("go?", default=True):
        raise click.Abort()
    with click.progressbar(length=len(waiting), label="retrying now", file=sys.stderr,
                           show_pos=True) as bar:
        done = [0]

        def progress(n: int) -> None:
            bar.update(n - done[0])
            done[0] = n

        out = ops.retry_now(common.actor(), tenant, rate=rate, progress=progress)
    for event_id, why in out.left:
        click.echo(f"{event_id}: {why}", err=True)
    click.echo(f"{out.done} of {len(waiting)} put back in their lanes; "
               "`rilla-bridge events show ID` shows how each goes")
