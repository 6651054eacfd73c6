"""The commands that read the history database (``ops/cli/events.py``, ``ops/cli/dlq.py``'s
``list``/``show`` and ``select_from_history``, ``ops/cli/db.py``) on a SQLite file filled
through the history writer, as the history process fills it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from ops.cli import main
from ops.cli.dlq import select_from_history
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, writer
from rilla_bridge.history.queries import DeadLetterFilter
from rilla_bridge.history.records import Record
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import ACME_KEY, BETA_KEY, TENANTS, HistoryRecords, load

SECRETS = (ACME_KEY, BETA_KEY, "acme-signing-key-0001", "beta-signing-key-0002",
           "beta-callingly-token-02")


def apply(engine: Engine, records: Sequence[Record]) -> None:
    with db.writing(engine) as conn:
        writer.apply(conn, records, parse_tenants(TENANTS, env={}))


@pytest.fixture
def env(history_db: Engine, tmp_path: Path) -> dict[str, str]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(tenants),
            "DATABASE_URL": history_db.url.render_as_string()}


def cli(env: dict[str, str], *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    for secret in SECRETS:
        assert secret not in result.output, args
    assert (result.exit_code == 0) == ok, result.output
    return result


@pytest.fixture
def seeded(history_db: Engine, clock: FakeClock) -> dict[str, str]:
    """A delivered call that needed a retry, a second event of it, a dead letter whose Rilla
    answer echoes the tenant's key, and a dead Callingly call of beta."""
    rec = HistoryRecords(clock)
    post = {**load("callrail", "post_call"), "resource_id": "CAL1"}
    batch = [rec.received("ev_1", post, call_id="CAL1")]
    clock.advance(1)
    batch.append(rec.attempt("ev_1", 1, 500, "retry_scheduled"))
    clock.advance(5)
    batch.append(rec.attempt("ev_1", 2, 200, "delivered"))
    clock.advance(1)
    batch += rec.delivered_event("ev_2", {**post, "duration": "100"}, kind="call_modified",
                                 call_id="CAL1")
    clock.advance(1)
    batch += [rec.received("ev_3", {**post, "resource_id": "CAL3"}, call_id="CAL3"),
              rec.attempt("ev_3", 1, 422, "dead", reason="rejected"),
              rec.dead("ev_3", call_id="CAL3", reason=f"API key {ACME_KEY} is not in Rilla",
                       payload={"event_id": "callrail-CAL3", "title": "Jordan Pike"})]
    clock.advance(1)
    cg = load("callingly", "call_completed")
    batch += [rec.received("ev_4", cg, tenant="beta", source="callingly",
                           kind="call_completed", call_id=str(cg["id"])),
              rec.step("ev_4", "dead", reason="no rep email"),
              rec.dead("ev_4", tenant="beta", source="callingly", reason_code="transform",
                       reason="no rep email for the call", status_code=None, attempts=0,
                       call_id=str(cg["id"]))]
    apply(history_db, batch)
    return {"delivered": "ev_1", "modified": "ev_2", "rejected": "ev_3", "beta": "ev_4"}


# -- events show / list -----------------------------------------------------------------------
def test_events_show_prints_the_record_and_timeline(env: dict[str, str],
                                                    seeded: dict[str, str]) -> None:
    out = cli(env, "events", "show", "ev_1").output
    lines = out.splitlines()
    assert lines[0].startswith("ev_1  callrail/acme  kind post_call  call CAL1")
    assert lines[1] == "status: delivered"
    assert lines[2].startswith("  2026-01-01 00:00:00  received (")
    assert "2026-01-01 00:00:01  attempt  n=1, op=upsert, status=500" in out
    assert "2026-01-01 00:00:06  attempt  n=2, op=upsert, status=200" in out
    assert "same call (callrail-CAL1):" in out and "ev_2" in out
    dead = cli(env, "events", "show", "ev_3").output
    assert "dead letter 2026-01-01 00:00:09: open, rilla_rejected" in dead
    assert "[Filtered]" in dead


def test_events_show_json(env: dict[str, str], seeded: dict[str, str]) -> None:
    shown = json.loads(cli(env, "events", "show", "ev_1", "--json").output)
    assert [e["what"] for e in shown["timeline"]] == ["attempt", "attempt"]
    assert "body" not in shown["event"] and "last_payload" not in shown["event"]
    assert shown["event"]["event_id"] == "callrail-CAL1"
    assert [e["id"] for e in shown["same_call"]] == ["ev_2"]


def test_events_show_of_an_unknown_event_names_the_database(env: dict[str, str]) -> None:
    missing = cli(env, "events", "show", "ev_nope", ok=False)
    assert "no event ev_nope in the history database sqlite:///" in missing.output
    assert "Redis at redis://127.0.0.1:1/0 did not answer" in missing.output


def test_events_show_says_where_it_looked(env: dict[str, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the wrong Redis/database an operator must see which ones were searched."""
    import fakeredis

    from ops.cli import common
    from rilla_bridge import keys

    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(common, "client", lambda settings: fake)
    env = {**env, "REDIS_URL": "redis://:s3cret-redis-pass@10.0.0.7:6380/4"}
    out = cli(env, "events", "show", "ev_nope", ok=False).output
    assert "looked in the history database sqlite:///" in out
    assert "and in Redis at redis://:***@10.0.0.7:6380/4" in out
    assert "s3cret-redis-pass" not in out
    # In progress, history not written yet: say so instead of "no event".
    fake.hset(keys.event("ev_live"), mapping={"tenant": "acme", "status": "retry_scheduled",
                                               "attempts": "2"})
    out = cli(env, "events", "show", "ev_live", ok=False).output
    assert "not in the history database sqlite:///" in out
    assert "in progress in Redis at redis://:***@10.0.0.7:6380/4: status retry_scheduled" in out


def test_events_list(env: dict[str, str], seeded: dict[str, str]) -> None:
    out = cli(env, "events", "list").output.splitlines()
    assert out[0].split()[:3] == ["ID", "RECEIVED", "(UTC)"]
    assert [line.split()[0] for line in out[1:5]] == ["ev_4", "ev_3", "ev_2", "ev_1"]
    assert out[-1] == "4 event(s), newest first"
    rows = json.loads(cli(env, "events", "list", "--json").output)
    assert {"id", "tenant", "source", "kind", "status", "event_id", "received_at"} <= set(
        rows[0])
    assert rows[0]["event_id"] == "callingly-41872219"


@pytest.mark.parametrize(("args", "expected"), [
    (["--tenant", "acme"], ["ev_3", "ev_2", "ev_1"]),
    (["--source", "callingly"], ["ev_4"]),
    (["--status", "dead"], ["ev_4", "ev_3"]),
    (["--kind", "call_modified"], ["ev_2"]),
    (["--phone", "(720) 555-0139"], ["ev_3", "ev_2", "ev_1"]),
    (["--phone", "602.555.0148"], ["ev_4"]),
    (["--name", "marcus", "--since", "2026-01-01"], ["ev_4"]),
    (["--call-id", "callrail-CAL1"], ["ev_2", "ev_1"]),
    (["--call-id", "CAL3"], ["ev_3"]),
    (["--rep", "mike.r@acme.example"], ["ev_3", "ev_2", "ev_1"]),
    (["--since", "2026-01-01T00:00:07", "--until", "2026-01-01 00:00:10"], ["ev_3", "ev_2"]),
    (["--since", "2026-01-01T01:00:00+01:00"], ["ev_4", "ev_3", "ev_2", "ev_1"]),
    (["--tenant", "nobody"], []),
])
def test_events_list_filters(env: dict[str, str], seeded: dict[str, str], args: list[str],
                             expected: list[str]) -> None:
    rows = json.loads(cli(env, "events", "list", "--json", *args).output)
    assert [r["id"] for r in rows] == expected


def test_events_list_pages_and_empty(env: dict[str, str], seeded: dict[str, str]) -> None:
    first = cli(env, "events", "list", "--limit", "3").output.splitlines()
    assert "; older: --before " in first[-1]
    cursor = first[-1].split("--before ", 1)[1]
    rest = json.loads(cli(env, "events", "list", "--json", "--before", cursor).output)
    assert [r["id"] for r in rest] == ["ev_1"]
    none = cli(env, "events", "list", "--tenant", "zzz").output
    assert none.startswith("no events match (searched sqlite:///")
    bad = cli(env, "events", "list", "--since", "last tuesday", ok=False)
    assert "not an ISO date/datetime or an age" in bad.output


# -- dlq list / show --------------------------------------------------------------------------
def test_dlq_list_json(env: dict[str, str], seeded: dict[str, str]) -> None:
    rows = json.loads(cli(env, "dlq", "list", "--json").output)
    assert [r["id"] for r in rows] == ["ev_3", "ev_4"]          # oldest failure first
    for row in rows:
        assert {"id", "tenant", "source", "event_id", "reason", "status_code", "attempts",
                "failed_at", "reason_code"} <= set(row)
    rej, beta = rows
    assert (rej["tenant"], rej["source"], rej["status_code"], rej["attempts"]) == (
        "acme", "callrail", 422, 1)
    assert rej["event_id"] == "callrail-CAL3" and isinstance(rej["failed_at"], float)
    assert "[Filtered]" in rej["reason"]
    assert (beta["status_code"], beta["attempts"], beta["reason_code"]) == (None, 0, "transform")


@pytest.mark.parametrize(("args", "expected"), [
    (["--tenant", "acme"], ["ev_3"]),
    (["--source", "callingly"], ["ev_4"]),
    (["--reason", "rilla_rejected"], ["ev_3"]),
    (["--reason", "REP EMAIL"], ["ev_4"]),
    (["--tenant", "acme", "--reason", "transform"], []),
])
def test_dlq_list_filters(env: dict[str, str], seeded: dict[str, str], args: list[str],
                          expected: list[str]) -> None:
    assert [r["id"] for r in json.loads(cli(env, "dlq", "list", "--json", *args).output)] == (
        expected)


def test_dlq_list_table(env: dict[str, str], seeded: dict[str, str]) -> None:
    lines = cli(env, "dlq", "list").output.splitlines()
    assert lines[0].split()[:3] == ["ID", "TENANT", "SOURCE"]
    assert lines[0].split()[8] == "CODE"
    assert lines[1].split()[:5] == ["ev_3", "acme", "callrail", "422", "1"]
    assert lines[1].split()[7] == "rilla_rejected"
    assert "2026-01-01 00:00:09" in lines[1]
    assert lines[2].split()[:5] == ["ev_4", "beta", "callingly", "-", "0"]
    assert lines[2].split()[7] == "transform"
    assert lines[-1] == "2 dead letter(s)"
    assert cli(env, "dlq", "list", "--limit", "1").output.splitlines()[-1] == (
        "1 dead letter(s) (the first 1; more with --limit)")
    none = cli(env, "dlq", "list", "--tenant", "zzz").output
    assert none.startswith("no dead letters match (searched sqlite:///")


def test_dlq_show(env: dict[str, str], seeded: dict[str, str]) -> None:
    entry = json.loads(cli(env, "dlq", "show", "ev_3", "--json").output)
    assert entry["id"] == "ev_3" and entry["status_code"] == 422
    assert entry["reason_code"] == "rilla_rejected" and entry["attempts"] == 1
    assert entry["payload"] == {"event_id": "callrail-CAL3", "title": "Jordan Pike"}
    assert entry["raw_event"]["resource_id"] == "CAL3"
    assert entry["first_failure_at"] and entry["failed_at"] and entry["received_at"]
    assert "is not in Rilla" in entry["response_body"]
    by_key = json.loads(cli(env, "dlq", "show", entry["dead_letter_id"], "--json").output)
    assert by_key["id"] == "ev_3"
    # For a person: labelled lines, readable UTC times, the raw event and payload indented.
    human = cli(env, "dlq", "show", "ev_3").output
    lines = human.splitlines()
    assert lines[0] == "dead letter ev_3  (open)"
    assert "  reason        rilla_rejected: " in human
    assert "  Rilla said    422: " in human and "is not in Rilla" in human
    assert "  last failed   2026-01-01 00:00:09 UTC" in lines
    assert "raw event:" in lines and '    "resource_id": "CAL3",' in lines
    assert "last payload sent to Rilla:" in lines and '    "title": "Jordan Pike"' in lines
    assert not human.lstrip().startswith("{")
    missing = cli(env, "dlq", "show", "ev_nope", ok=False)
    assert "no dead letter ev_nope in sqlite:///" in missing.output


def test_dlq_show_masks_callingly_recording_links(env: dict[str, str], history_db: Engine,
                                                  clock: FakeClock) -> None:
    """Callingly recording links are bearer links, like CallRail's access_key."""
    rec = HistoryRecords(clock)
    link = "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3"
    cg = load("callingly", "call_completed")
    assert cg["recording_url"] == link
    apply(history_db, [
        rec.received("ev_cg", cg, tenant="beta", source="callingly", kind="call_completed",
                     call_id=str(cg["id"])),
        rec.dead("ev_cg", tenant="beta", source="callingly", call_id=str(cg["id"]),
                 payload={"event_id": "callingly-41872219", "media_url": link})])
    for args in (("dlq", "show", "ev_cg"), ("dlq", "show", "ev_cg", "--json")):
        out = cli(env, *args).output
        assert "4f9a2c71e0b84d3a" not in out and "recordings/" not in out
        assert "https://cdn.callingly.com/[Filtered]" in out


def test_select_from_history(env: dict[str, str], seeded: dict[str, str],
                             history_db: Engine, clock: FakeClock,
                             capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env(env)
    everything = select_from_history(settings, (), True, DeadLetterFilter())
    assert [r["id"] for r in everything] == ["ev_3", "ev_4"]
    assert [r["id"] for r in select_from_history(
        settings, (), True, DeadLetterFilter(reason="transform"))] == ["ev_4"]
    chosen = select_from_history(settings, ("ev_4", "ev_1", "ev_3", "ev_4"), False,
                                 DeadLetterFilter(tenant="beta"))
    assert [r["id"] for r in chosen] == ["ev_4"]     # ev_3 is acme's; ev_1 never died
    assert "ev_1: not an open dead letter" in capsys.readouterr().err
    clock.advance(1)
    apply(history_db, [HistoryRecords(clock).handled("ev_4", "deleted")])
    assert select_from_history(settings, ("ev_4",), False, DeadLetterFilter()) == []
    with pytest.raises(click.UsageError):
        select_from_history(settings, ("ev_3",), True, DeadLetterFilter())
    with pytest.raises(click.UsageError):
        select_from_history(settings, (), False, DeadLetterFilter())


# -- db upgrade and a database that is not there -------------------------------------------
def test_db_upgrade_twice(env: dict[str, str], tmp_path: Path) -> None:
    fresh = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}
    for _ in range(2):
        out = cli(fresh, "db", "upgrade").output
        assert out.strip() == (f"history database sqlite:///{tmp_path / 'new.db'}: "
                               "schema revision 0003, the newest")


def test_an_unreachable_database_is_named_without_its_password(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    from tests.support import free_port

    pg = {**env, "DATABASE_URL": f"postgres://rb:hunter2-pw@127.0.0.1:{free_port()}/h"}
    for args in (["db", "upgrade"], ["events", "list"], ["dlq", "show", "ev_1"]):
        result = cli(pg, *args, ok=False)
        assert "hunter2" not in result.output
        assert "postgresql+psycopg://rb:***@127.0.0.1:" in result.output
        assert "OperationalError" in result.output
    nofile = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"}
    result = cli(nofile, "dlq", "list", ok=False)
    assert "no history database at sqlite:///" in result.output
    assert "rilla-bridge db upgrade" in result.output
    assert not (tmp_path / "none.db").exists()


def test_settings_of_the_cli_use_the_environment(env: dict[str, str]) -> None:
    s: Any = Settings.from_env(env)
    assert s.database_url.startswith("sqlite:///")
