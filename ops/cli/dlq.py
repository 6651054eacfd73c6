"""``rilla-bridge dlq``: inspect, replay and delete dead letters.

``list`` and ``show`` read the history database; ``select_from_history`` picks the dead
letters ``replay`` and ``delete`` act on from there too (``replay``/``delete`` themselves still
act on the Redis store until lifecycle's replay moves over).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.engine import Connection

from ops.cli import common, main
from rilla_bridge.clock import SystemClock
from rilla_bridge.history import queries
from rilla_bridge.history.queries import DeadLetterFilter
from rilla_bridge.observability import redact_text
from rilla_bridge.operations import BulkResult, Operations
from rilla_bridge.settings import Settings

WORKER_PROCESSES = ("worker", "callrail")


@main.group()
def dlq() -> None:
    """Inspect, replay and delete dead letters."""


def _selectors(f: Any) -> Any:
    f = click.option("--reason", help="reason code or text fragment")(f)
    f = click.option("--source", type=click.Choice(["callrail", "callingly"]))(f)
    return click.option("--tenant", help="tenant slug")(f)


def _row(dl: dict[str, Any]) -> dict[str, Any]:
    """A dead letter as the command line shows it: ``id`` is our event id (what operators
    type), ``event_id`` the Rilla event id, ``dead_letter_id`` the history's own key."""
    return {"id": dl["event_id"], "dead_letter_id": dl["id"], "tenant": dl["tenant"],
            "source": dl["source"], "kind": dl.get("kind"), "call_id": dl.get("call_id"),
            "event_id": dl.get("rilla_event_id") or "", "reason_code": dl["reason_code"],
            "reason": dl["reason"], "status_code": dl["status_code"],
            "attempts": dl["attempts"] or 0, "first_failure_at": dl.get("first_failure_at"),
            "failed_at": dl["failed_at"], "handled_at": dl.get("handled_at"),
            "handled_how": dl.get("handled_how"), "handled_by": dl.get("handled_by")}


def _open_letters(conn: Connection, f: DeadLetterFilter, limit: int | None
                  ) -> tuple[list[dict[str, Any]], bool]:
    """Dead letters matching ``f``, oldest failure first, page by page up to ``limit``
    (None: all); and whether more were left out."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        want = queries.MAX_LIMIT if limit is None else min(queries.MAX_LIMIT, limit - len(rows))
        page = queries.dead_letters_page(conn, f, limit=want, after=cursor)
        rows += [_row(r) for r in page.rows]
        cursor = page.next
        if cursor is None:
            return rows, False
        if limit is not None and len(rows) >= limit:
            return rows, True


def select_from_history(settings: Settings, ids: tuple[str, ...], all_: bool,
                        f: DeadLetterFilter) -> list[dict[str, Any]]:
    """The open dead letters a ``dlq replay`` / ``dlq delete`` acts on, from the history
    database: the given event ids (each one that is not an open dead letter, or does not
    match the filters, is left out with a note on stderr), or with ``all_`` every open one
    matching ``f`` (oldest failure first). Rows as ``dlq list --json`` prints them."""
    if ids and all_:
        raise click.UsageError("give IDs or --all, not both")
    if not ids and not all_:
        raise click.UsageError("give one or more IDs, or --all (with optional filters)")
    with common.history(settings) as conn:
        if all_:
            return _open_letters(conn, f, None)[0]
        out = []
        for i in dict.fromkeys(ids):
            found = queries.dead_letter(conn, i)
            if found is None or found.get("handled_at") is not None:
                click.echo(f"{i}: not an open dead letter (replayed or deleted already?)",
                           err=True)
            elif f.matches(found):
                out.append(_row(found))
        return out


@dlq.command("list")
@_selectors
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
def dlq_list(tenant: str | None, source: str | None, reason: str | None, limit: int,
             as_json: bool) -> None:
    """List open dead letters, oldest failure first."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    with common.history(settings) as conn:
        rows, more = _open_letters(conn, DeadLetterFilter(tenant, source, reason), limit)
    if as_json:
        click.echo(redact_text(json.dumps(rows, indent=2)))
        return
    if not rows:
        click.echo("no dead letters" + (" match" if tenant or source or reason else "")
                   + f" (searched {settings.database_url_masked})")
        return
    click.echo(f"{'ID':<34} {'TENANT':<18} {'SOURCE':<9} {'STATUS':<6} {'ATT':>3}  "
               f"{'FAILED AT (UTC)':<19}  {'CODE':<17} REASON")
    for r in rows:
        click.echo(redact_text(
            f"{r['id']:<34} {r['tenant'][:18]:<18} {r['source']:<9} "
            f"{r['status_code'] if r['status_code'] is not None else '-':<6} "
            f"{r['attempts']:>3}  {common.when(r['failed_at']):<19}  "
            f"{r['reason_code'] or '-':<17} {r['reason'][:100]}"))
    click.echo(f"{len(rows)} dead letter(s)" + (f" (the first {limit}; more with --limit)"
                                                 if more else ""))


@dlq.command("show")
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(dead_letter_id: str, as_json: bool) -> None:
    """Everything kept about one dead letter (raw event, last payload, Rilla's answer)."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    with common.history(settings) as conn:
        found = queries.dead_letter(conn, dead_letter_id)
    if found is None:
        raise click.ClickException(f"no dead letter {dead_letter_id} in "
                                   f"{settings.database_url_masked}")
    entry = _row(found)
    entry["received_at"] = found.get("received_at")
    entry["response_body"] = found.get("response_body")
    body = bytes(found.get("body") or b"")
    try:
        entry["raw_event"] = json.loads(body) if body else None
    except ValueError:
        entry["raw_event"] = body.decode("utf-8", "replace")
    try:
        entry["payload"] = json.loads(found["payload"]) if found.get("payload") else None
    except ValueError:
        entry["payload"] = found["payload"]
    if as_json:   # everything kept, nothing secret
        click.echo(redact_text(json.dumps(entry, indent=2, default=str)))
        return
    click.echo(redact_text(_human(entry)))


def _human(e: dict[str, Any]) -> str:
    """``dlq show`` for a person: what failed, when (UTC), why, then the raw event and the
    last payload sent."""
    state = ("open" if not e.get("handled_at") else
             f"handled: {e.get('handled_how')} by {e.get('handled_by') or '-'} at "
             f"{common.when(e['handled_at'])} UTC")
    status = e["status_code"] if e["status_code"] is not None else "no answer"
    lines = [
        f"dead letter {e['id']}  ({state})",
        f"  tenant        {e['tenant']}   source {e['source']}   kind {e.get('kind') or '-'}"
        f"   call {e.get('call_id') or '-'}",
        f"  Rilla event   {e['event_id'] or '-'}",
        f"  reason        {e['reason_code']}: {e['reason']}",
        f"  Rilla said    {status}" + (f": {str(e['response_body']).strip()[:500]}"
                                       if e.get("response_body") else ""),
        f"  attempts      {e['attempts']}",
        f"  received      {common.when(e.get('received_at'))} UTC",
        f"  first failed  {common.when(e.get('first_failure_at'))} UTC",
        f"  last failed   {common.when(e.get('failed_at'))} UTC",
        "raw event:" if e.get("raw_event") is not None else "raw event: (not kept)",
    ]
    if e.get("raw_event") is not None:
        lines.append(_indented(e["raw_event"]))
    lines.append("last payload sent to Rilla:" if e.get("payload") is not None
                 else "last payload sent to Rilla: (none: Rilla was not called)")
    if e.get("payload") is not None:
        lines.append(_indented(e["payload"]))
    lines.append(f"replay: rilla-bridge dlq replay {e['id']}")
    return "\n".join(lines)


def _indented(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
    return "\n".join("  " + line for line in text.splitlines())


def _bulk(action: str, rows: list[dict[str, Any]], dry_run: bool,
          run: Callable[[list[str], Callable[[int], None]], BulkResult]) -> BulkResult:
    stem = action[:-1] if action.endswith("e") else action  # delete -> deleted, deleting
    ids = [str(r["id"]) for r in rows]
    if dry_run:
        for r in rows:
            click.echo(redact_text(f"would {action} {r['id']}  {r['tenant']}  "
                                   f"{r['reason_code']}: {str(r['reason'])[:80]}"))
        click.echo(f"dry run: {len(ids)} dead letter(s) would be {stem}ed")
        return BulkResult()
    with click.progressbar(length=len(ids), label=f"{stem}ing", file=sys.stderr,
                           show_pos=True) as bar:
        done_so_far = [0]

        def progress(n: int) -> None:
            bar.update(n - done_so_far[0])
            done_so_far[0] = n

        out = run(ids, progress)
    for event_id, why in out.left:
        click.echo(f"{event_id}: not {stem}ed: {why}", err=True)
    click.echo(f"{stem}ed {out.done} of {len(ids)} dead letter(s)")
    return out


def _operations(settings: Settings) -> Operations:
    from rilla_bridge.history.db import make_engine

    return Operations(settings, common.client(settings), make_engine(settings), SystemClock(),
                      common.tenants(settings))


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter matching the filters")
@_selectors
@click.option("--dry-run", is_flag=True, help="only list what would be replayed")
@click.option("--yes", "--force", "yes", is_flag=True,
              help="replay even while a worker runs another tenants configuration")
@click.option("--wait", is_flag=True,
              help="follow the replayed events until each is delivered or dead again, then "
                   "list the outcomes (exit status 1 if any died again)")
@click.option("--timeout", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="with --wait: seconds to wait at most")
def dlq_replay(ids: tuple[str, ...], all_: bool, tenant: str | None, source: str | None,
               reason: str | None, dry_run: bool, yes: bool, wait: bool,
               timeout: float) -> None:
    """Re-run dead letters from their raw events through the normal pipeline (the tenants
    file as it is now applies), paced through each tenant's bulk lane. Warns first (and
    asks, unless --yes) while any worker still runs an older tenants configuration."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    rows = select_from_history(settings, ids, all_, DeadLetterFilter(tenant, source, reason))
    if rows and not dry_run:
        _check_worker_versions(settings, yes)
    ops = _operations(settings) if not dry_run else None
    since = ops.clock.now() if ops else 0.0
    out = _bulk("replay", rows, dry_run,
                lambda chosen, progress: ops.replay(chosen, common.actor(), progress=progress)
                if ops else BulkResult())
    if wait and ops and out.done:
        left = {event_id for event_id, _ in out.left}
        _follow(ops, [str(r["id"]) for r in rows if str(r["id"]) not in left], since, timeout)


def _follow(ops: Operations, ids: list[str], since: float, timeout: float) -> None:
    """Wait for the replayed events to finish; a progress bar on a terminal, a plain line
    per change otherwise; then the outcomes. Exit status 1 when any died again."""
    outcomes: dict[str, tuple[str, str]] = {}
    deadline = ops.clock.now() + timeout
    tty = sys.stderr.isatty()
    bar = click.progressbar(length=len(ids), label="finishing", file=sys.stderr,
                            show_pos=True) if tty else None
    if bar:
        bar.__enter__()
    try:
        while True:
            before = len(outcomes)
            for event_id in ids:
                if event_id not in outcomes:
                    state, why = ops.outcome(event_id, since)
                    if state != "pending":
                        outcomes[event_id] = (state, why)
            if len(outcomes) != before:
                if bar:
                    bar.update(len(outcomes) - before)
                else:
                    click.echo(f"finished {len(outcomes)} of {len(ids)}", err=True)
            if len(outcomes) == len(ids) or ops.clock.now() >= deadline:
                break
            ops.clock.sleep(1.0)
    finally:
        if bar:
            bar.__exit__(None, None, None)
    counts: dict[str, int] = {}
    for state, _ in outcomes.values():
        counts[state] = counts.get(state, 0) + 1
    pending = [i for i in ids if i not in outcomes]
    for event_id in ids:
        state, why = outcomes.get(event_id, ("still running", ""))
        if state != "delivered":
            click.echo(redact_text(f"{event_id}: {'dead again' if state == 'dead' else state}"
                                   + (f": {why[:200]}" if why else "")))
    click.echo(f"outcomes: {counts.get('delivered', 0)} delivered, {counts.get('dead', 0)} "
               f"dead again, {counts.get('skipped', 0)} skipped"
               + (f", {len(pending)} still running after {timeout:g} s" if pending else ""))
    if counts.get("dead") or pending:
        raise click.exceptions.Exit(1)


def _check_worker_versions(settings: Settings, yes: bool) -> None:
    """A replay runs in the workers with the configuration they hold: one still on an older
    tenants file would dead-letter the events again. Say so, and ask."""
    version = common.tenants_config(settings).version
    rows = common.running_versions(settings, SystemClock().now())
    if rows is None:
        return   # Redis does not answer: the replay itself will say so
    workers = [r for r in rows if r["process"] in WORKER_PROCESSES]
    old = [r for r in workers if r["version"] != version]
    if not workers:
        click.echo("warning: no worker has reported its tenants configuration in the last "
                   "30 s; the replayed events wait until one runs", err=True)
        return
    if not old:
        return
    click.echo(f"warning: {len(old)} of {len(workers)} worker(s) still run another tenants "
               f"configuration than this one ({version}); they would replay with it:", err=True)
    for r in old:
        why = (f" (refused {r['refused_version']}: {r.get('refused_reason', '')})"
               if r.get("refused_version") else "")
        click.echo(f"  {r['process']} {r['host']}:{r['pid']} runs {r['version']}{why}",
                   err=True)
    click.echo("  they pick up a changed file within seconds (TENANTS_TOML: restart them); "
               "see `rilla-bridge tenants check`", err=True)
    if not yes and not click.confirm("replay anyway?", default=False, err=True):
        raise click.ClickException("replay not started (use --yes to replay anyway)")


@dlq.command("delete")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter matching the filters")
@_selectors
@click.option("--dry-run", is_flag=True, help="only list what would be deleted")
def dlq_delete(ids: tuple[str, ...], all_: bool, tenant: str | None, source: str | None,
               reason: str | None, dry_run: bool) -> None:
    """Close dead letters without running them (history keeps the events)."""
    settings = common.settings()
    common.register_tenant_secrets(settings)
    rows = select_from_history(settings, ids, all_, DeadLetterFilter(tenant, source, reason))
    ops = _operations(settings) if not dry_run else None
    _bulk("delete", rows, dry_run,
          lambda chosen, _progress: ops.delete(chosen, common.actor()) if ops
          else BulkResult())
