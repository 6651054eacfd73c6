"""``rilla-bridge quota`` and ``backfill``: the CallRail budget, and recovering a window of
calls after an outage."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from ops.cli import common, main
from rilla_bridge import keys
from workers.callrail_jobs import estimate_requests, start_run


@main.command()
@click.option("--json", "as_json", is_flag=True)
def quota(as_json: bool) -> None:
    """Per CallRail account: budget used and left this hour and day, pauses, waiting work."""
    settings = common.settings()
    guard = common.guard(settings, common.client(settings))
    rows = [guard.status(a) for a in sorted(guard.accounts_known())]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no CallRail account has used or queued anything recently")
        return
    for n, st in enumerate(rows):
        paused = st.get("paused_until")
        pause = (f"PAUSED until {common.when(paused)} UTC (level {st.get('pause_level')})"
                 if paused else "not paused")
        click.echo(("\n" if n else "") + f"CallRail account {st['account']}: {pause}; limits "
                   f"{guard.hourly_limit}/hour, {guard.daily_limit}/day")
        click.echo(f"  {'LANE':<10} {'HOUR USED':>9} {'HOUR LEFT':>9} {'DAY USED':>9} "
                   f"{'DAY LEFT':>9} {'WAITING':>8}")
        lanes = st.get("lanes") or {}
        for lane, use in lanes.items():
            click.echo(f"  {lane:<10} {use['hour_used']:>9} {use['hour_left']:>9} "
                       f"{use['day_used']:>9} {use['day_left']:>9} {use['waiting']:>8}")
        click.echo(f"  {'total':<10} {st['hour_used']:>9} {st['hour_left']:>9} "
                   f"{st['day_used']:>9} {st['day_left']:>9} "
                   f"{sum((st.get('waiting') or {}).values()):>8}")


@main.command()
@click.option("--tenant", "slug", required=True, help="tenant slug (needs CallRail API access)")
@click.option("--since", required=True, help="start, ISO date or datetime (UTC if no offset)")
@click.option("--until", default=None, help="end (default: now)")
@click.option("--yes", is_flag=True, help="do not ask before starting")
@click.option("--wait/--no-wait", default=True, help="follow progress until done")
def backfill(slug: str, since: str, until: str | None, yes: bool, wait: bool) -> None:
    """Recover a window of CallRail calls after an outage, within the quota."""
    settings = common.settings()
    tenant = common.tenants(settings).get(slug)
    if tenant is None or tenant.callrail is None or not tenant.callrail.api_enabled:
        raise click.ClickException(f"tenant {slug!r} has no [callrail] account_id and api_key")
    start, end = _parse_when(since), (_parse_when(until) if until else datetime.now(UTC))
    if end <= start:
        raise click.ClickException("--until must be after --since")
    client = common.client(settings)
    guard = common.guard(settings, client)

    click.echo("counting calls in the window (1 CallRail request, through the quota) ...")
    run_id = start_run(client, guard, tenant, "backfill", start, end, count_first=True)
    info = _wait_for(client, keys.run(run_id), "counted", timeout=600)
    if info.get("error"):
        raise click.ClickException(f"count failed: {info['error']}")
    total = int(info.get("total", 0))
    pages, lookups = estimate_requests(total)
    st = guard.status(str(tenant.callrail.account_id))
    share = int(settings.backfill_budget_share * 100)
    click.echo(f"{total} call(s) between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC")
    click.echo(f"estimated budget: {pages} list request(s) + up to {lookups} recording "
               f"lookup(s) (only for calls no webhook brought) = at most {pages + lookups}")
    click.echo(f"account {tenant.callrail.account_id}: {st['hour_left']} left this hour, "
               f"{st['day_left']} today; backfill may use {share}% of each window")
    if not yes and not click.confirm("start the backfill?", default=True):
        raise click.Abort()
    run2 = start_run(client, guard, tenant, "backfill", start, end)
    click.echo(f"backfill {run2} queued; it runs in the callrail workers and survives restarts")
    if not wait:
        return
    with click.progressbar(length=max(1, pages), label="pages", file=sys.stderr,
                           show_pos=True) as bar:
        done_pages = 0
        while True:
            info = {common.text(k): common.text(v)
                    for k, v in client.hgetall(keys.run(run2)).items()}
            pages_now = int(info.get("pages", 0))
            bar.update(pages_now - done_pages)
            done_pages = pages_now
            if info.get("done"):
                break
            time.sleep(1)
    if info.get("error"):
        raise click.ClickException(f"backfill stopped: {info['error']}")
    click.echo(f"done: {info.get('seen', 0)} call(s) listed, {info.get('fed', 0)} new ones "
               "fed to the pipeline (`rilla-bridge events show` / `dlq list` for outcomes)")


def _parse_when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO date or datetime") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _wait_for(client: Any, key: str, field: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = {common.text(k): common.text(v) for k, v in client.hgetall(key).items()}
        if info.get(field) or info.get("error"):
            return info
        time.sleep(0.5)
    raise click.ClickException("timed out waiting for the callrail worker (is it running?)")
