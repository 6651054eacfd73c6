"""``rilla-bridge``: the operator's command line (SPEC "Operations")."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from rilla_bridge.dlq import DeadLetters, Selector
from rilla_bridge.events import EventStore
from rilla_bridge.observability import redact_text, register_secrets
from rilla_bridge.redis_conn import make_redis
from rilla_bridge.settings import ConfigError, Settings
from rilla_bridge.tenants import load_tenants, mask


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _when(ts: Any) -> str:
    if ts in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _register_tenant_secrets(settings: Settings) -> None:
    try:
        tenants = load_tenants(settings.tenants_file)
    except ConfigError:
        return
    register_secrets(s for t in tenants.values() for s in t.secrets())


@click.group()
def main() -> None:
    """rilla-bridge: CallRail and Callingly calls into Rilla."""


# -- tenants ------------------------------------------------------------------------------
@main.group()
def tenants() -> None:
    """The tenants file."""


@tenants.command("check")
@click.option("--file", "path", help="tenants file (default: TENANTS_FILE)")
def tenants_check(path: str | None) -> None:
    """Validate the tenants file and print a summary with every secret masked."""
    settings = _settings()
    try:
        loaded = load_tenants(path or settings.tenants_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path or settings.tenants_file}: {len(loaded)} tenant(s) OK")
    for t in loaded.values():
        click.echo(f"- {t.slug}: rilla_api_key {mask(t.rilla_api_key)}, "
                   f"default_user_email {t.default_user_email or '-'}, "
                   f"deliver_unrecorded {str(t.deliver_unrecorded).lower()}, "
                   f"{len(t.users)} user mapping(s)")
        if t.callrail:
            api = (f"account {t.callrail.account_id}, api_key {mask(t.callrail.api_key)}"
                   if t.callrail.api_enabled else "no API access")
            click.echo(f"    callrail: signing_key {mask(t.callrail.signing_key)}, {api}"
                       + (f", company {t.callrail.company_id}" if t.callrail.company_id else ""))
        if t.callingly:
            click.echo(f"    callingly: webhook_token {mask(t.callingly.webhook_token)}")
        if not t.callrail and not t.callingly:
            click.echo("    (no [callrail] or [callingly] section: its webhooks answer 404)")


# -- events -------------------------------------------------------------------------------
@main.group()
def events() -> None:
    """Received events and their timelines."""


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def events_show(event_id: str, as_json: bool) -> None:
    """Print one event's record and whole timeline."""
    settings = _settings()
    _register_tenant_secrets(settings)
    client = make_redis(settings)
    store = EventStore(client, dedup_window=settings.dedup_window_seconds,
                       retention=settings.event_retention_seconds)
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
    click.echo(f"  {_when(event.get('received_at'))}  received ({event.get('size')} bytes)")
    for entry in timeline:
        details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("t", "what"))
        click.echo(redact_text(f"  {_when(entry.get('t'))}  {entry.get('what')}"
                               + (f"  {details}" if details else "")))


# -- dead letters -------------------------------------------------------------------------
@main.group()
def dlq() -> None:
    """Inspect, replay and delete dead letters."""


def _selectors(f: Any) -> Any:
    f = click.option("--reason", help="reason code or text fragment")(f)
    f = click.option("--source", type=click.Choice(["callrail", "callingly"]))(f)
    return click.option("--tenant", help="tenant slug")(f)


def _dead_letters(settings: Settings) -> DeadLetters:
    return DeadLetters(make_redis(settings), retention=settings.event_retention_seconds)


@dlq.command("list")
@_selectors
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
def dlq_list(tenant: str | None, source: str | None, reason: str | None, as_json: bool) -> None:
    """List dead letters, oldest failure first."""
    settings = _settings()
    _register_tenant_secrets(settings)
    rows = list(_dead_letters(settings).iter(Selector(tenant, source, reason)))
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
            f"{r['attempts']:>3}  {_when(r['failed_at']):<19}  {r['reason'][:100]}"))
    click.echo(f"{len(rows)} dead letter(s)")


@dlq.command("show")
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(dead_letter_id: str, as_json: bool) -> None:
    """Everything kept about one dead letter (raw event, last payload, Rilla's answer)."""
    settings = _settings()
    _register_tenant_secrets(settings)
    entry = _dead_letters(settings).get(dead_letter_id)
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
    dl = _dead_letters(_settings())
    chosen = _select_ids(dl, ids, all_, Selector(tenant, source, reason))
    _bulk("replay", chosen, dl.replay, dry_run)


@dlq.command("delete")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter matching the filters")
@_selectors
@click.option("--dry-run", is_flag=True, help="only list what would be deleted")
def dlq_delete(ids: tuple[str, ...], all_: bool, tenant: str | None, source: str | None,
               reason: str | None, dry_run: bool) -> None:
    """Delete dead letters for good."""
    dl = _dead_letters(_settings())
    chosen = _select_ids(dl, ids, all_, Selector(tenant, source, reason))
    _bulk("delete", chosen, dl.delete, dry_run)


# -- processes ----------------------------------------------------------------------------
@main.command()
def scheduler() -> None:
    """Run the scheduler (due retries, lost-work sweep, CallRail dispatch, reconciliation)."""
    from workers.runtime import runtime
    from workers.scheduler import run_forever

    run_forever(runtime())


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("which", type=click.Choice(["rilla", "callrail"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sandbox(which: str, args: tuple[str, ...]) -> None:
    """Run a local stand-in for Rilla or CallRail; ``rilla-bridge sandbox rilla --help``."""
    if which == "rilla":
        from rilla_bridge.sandbox.rilla import main as sandbox_main
    else:
        from rilla_bridge.callrail.sandbox import main as sandbox_main
    sandbox_main(list(args))


@main.command()
def run() -> None:
    """Run the whole system locally (Redis if needed, sandboxes, every Procfile process)."""
    from rilla_bridge.localrun import run_local

    run_local()



# -- CallRail quota and backfill ----------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True)
def quota(as_json: bool) -> None:
    """Per CallRail account: budget used and left this hour and day, pauses, waiting work."""
    from workers.callrail_jobs import make_guard

    settings = _settings()
    guard = make_guard(settings, make_redis(settings))
    rows = [guard.status(a) for a in sorted(guard.accounts_known())]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no CallRail account has used or queued anything recently")
        return
    for st in rows:
        paused = st.get("paused_until")
        pause = (f"PAUSED until {_when(paused)} UTC (level {st.get('pause_level')})"
                 if paused else "not paused")
        waiting = st.get("waiting") or {}
        click.echo(f"account {st['account']}: hour {st['hour_used']}/{guard.hourly_limit} used "
                   f"({st['hour_left']} left), day {st['day_used']}/{guard.daily_limit} "
                   f"({st['day_left']} left), {pause}")
        click.echo("  waiting: " + ", ".join(f"{lane} {n}" for lane, n in waiting.items()))
        for lane, use in (st.get("lanes") or {}).items():
            click.echo(f"  lane {lane}: {use}")


@main.command()
@click.option("--tenant", "slug", required=True, help="tenant slug (needs CallRail API access)")
@click.option("--since", required=True, help="start, ISO date or datetime (UTC if no offset)")
@click.option("--until", default=None, help="end (default: now)")
@click.option("--yes", is_flag=True, help="do not ask before starting")
@click.option("--wait/--no-wait", default=True, help="follow progress until done")
def backfill(slug: str, since: str, until: str | None, yes: bool, wait: bool) -> None:
    """Recover a window of CallRail calls after an outage, within the quota."""
    from workers.callrail_jobs import estimate_requests, make_guard, run_key, start_run

    settings = _settings()
    tenants_ = load_tenants(settings.tenants_file)
    tenant = tenants_.get(slug)
    if tenant is None or tenant.callrail is None or not tenant.callrail.api_enabled:
        raise click.ClickException(f"tenant {slug!r} has no [callrail] account_id and api_key")
    start, end = _parse_when(since), (_parse_when(until) if until else datetime.now(UTC))
    if end <= start:
        raise click.ClickException("--until must be after --since")
    client = make_redis(settings)
    guard = make_guard(settings, client)

    click.echo("counting calls in the window (1 CallRail request, through the quota) ...")
    run_id = start_run(client, guard, tenant, "backfill", start, end, count_first=True)
    info = _wait_for(client, run_key(run_id), "counted", timeout=600)
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
            info = {_text(k): _text(v) for k, v in client.hgetall(run_key(run2)).items()}
            pages_now = int(info.get("pages", 0))
            bar.update(pages_now - done_pages)
            done_pages = pages_now
            if info.get("done"):
                break
            import time as _t

            _t.sleep(1)
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
    import time as _t

    deadline = _t.monotonic() + timeout
    while _t.monotonic() < deadline:
        info = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if info.get(field) or info.get("error"):
            return info
        _t.sleep(0.5)
    raise click.ClickException("timed out waiting for the callrail worker (is it running?)")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
