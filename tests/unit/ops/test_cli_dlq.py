"""``rilla-bridge dlq ...`` and ``rilla-bridge events show`` (``ops/cli/dlq.py``,
``ops/cli/events.py``) on fakeredis: the command line's client (``ops.cli.common.client``) is
the test's. Dead letters are made by a worker runtime on a ``FakeClock``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from ops.cli import common, main
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from tests.fakes import ACME_KEY, BETA_KEY, TENANTS, FakeRilla, load, make_runtime
from workers.pipeline import process_event
from workers.runtime import Runtime
from workers.scheduler import move_due_retries

SECRETS = (ACME_KEY, BETA_KEY, "acme-signing-key-0001", "beta-signing-key-0002",
           "beta-callingly-token-02")


@pytest.fixture
def env(fake_redis: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> dict[str, str]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(tenants)}


@pytest.fixture
def rt(fake_redis: redis.Redis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock)


def cli(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    for secret in SECRETS:
        assert secret not in result.output, args
    return result


def dead(rt: Runtime, body: dict[str, Any], *, tenant: str = "acme", source: str = "callrail",
         kind: str = "post_call", answer: RillaResult | None = None) -> str:
    assert isinstance(rt.rilla, FakeRilla)
    if answer is not None:
        rt.rilla.script = [answer]
    stored = rt.lifecycle.receive(source=source, tenant=tenant, kind=kind,
                                  body=json.dumps(body).encode(), call_id=None)
    assert process_event(rt, stored.event_id) == "dead_lettered"
    rt.clock.sleep(1)
    return stored.event_id


@pytest.fixture
def letters(rt: Runtime) -> dict[str, str]:
    post = load("callrail", "post_call")
    cg = load("callingly", "call_completed")
    return {
        # Rilla's body echoes the key: it must never reach the terminal.
        "rejected": dead(rt, post, answer=RillaResult(
            "permanent", 422, f"API key {ACME_KEY} is not in Rilla")),
        "start": dead(rt, {**post, "resource_id": "CAL" + "2" * 32, "start_time": "later",
                           "datetime": ""}),
        "beta": dead(rt, {**cg, "user": {**cg["user"], "email": None}}, tenant="beta",
                     source="callingly", kind="call_completed"),
    }


def test_list_json(env: dict[str, str], letters: dict[str, str]) -> None:
    result = cli(env, "dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert isinstance(rows, list) and len(rows) == 3
    for row in rows:
        assert {"id", "tenant", "source", "event_id", "reason", "status_code", "attempts",
                "failed_at"} <= set(row)
    by_id = {r["id"]: r for r in rows}
    rej = by_id[letters["rejected"]]
    assert (rej["tenant"], rej["source"], rej["status_code"], rej["attempts"]) == (
        "acme", "callrail", 422, 1)
    assert rej["event_id"].startswith("callrail-CAL")
    assert isinstance(rej["failed_at"], float)
    assert "[FILTERED]" in rej["reason"] or ACME_KEY not in rej["reason"]
    st = by_id[letters["start"]]
    assert st["status_code"] is None and st["attempts"] == 0
    assert "no usable start time" in st["reason"]


@pytest.mark.parametrize(("args", "expect"), [
    (["--tenant", "acme"], {"rejected", "start"}),
    (["--tenant", "beta"], {"beta"}),
    (["--source", "callingly"], {"beta"}),
    (["--reason", "rilla_rejected"], {"rejected"}),
    (["--reason", "start time"], {"start"}),
    (["--tenant", "acme", "--reason", "transform"], {"start"}),
    (["--tenant", "nobody"], set()),
])
def test_list_filters(env: dict[str, str], letters: dict[str, str], args: list[str],
                      expect: set[str]) -> None:
    result = cli(env, "dlq", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    assert {r["id"] for r in json.loads(result.output)} == {letters[n] for n in expect}


def test_list_table(env: dict[str, str], letters: dict[str, str]) -> None:
    result = cli(env, "dlq", "list")
    assert result.exit_code == 0
    assert letters["rejected"] in result.output and "3 dead letter(s)" in result.output
    lines = result.output.splitlines()
    # Oldest failure first, at the times of the clock that made them (UTC).
    assert [line.split()[0] for line in lines[1:4]] == [
        letters["rejected"], letters["start"], letters["beta"]]
    assert "2026-01-01 00:00:00" in lines[1] and "2026-01-01 00:00:02" in lines[3]
    assert "no dead letters match" in cli(env, "dlq", "list", "--tenant", "zzz").output


def test_show(env: dict[str, str], letters: dict[str, str]) -> None:
    result = cli(env, "dlq", "show", letters["rejected"], "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)
    assert entry["id"] == letters["rejected"]
    assert entry["status_code"] == 422
    assert "is not in Rilla" in entry["response_body"]
    assert entry["payload"]["event_id"] == entry["event_id"]
    assert entry["raw_event"]["resource_id"] == load("callrail", "post_call")["resource_id"]
    assert entry["attempts"] == 1 and entry["first_failure_at"] and entry["failed_at"]
    assert entry["reason_code"] == "rilla_rejected"
    missing = CliRunner().invoke(main, ["dlq", "show", "ev_nope"], env=env)
    assert missing.exit_code != 0 and "no dead letter ev_nope" in missing.output


def test_replay_dry_run_changes_nothing(env: dict[str, str], letters: dict[str, str],
                                        fake_redis: redis.Redis) -> None:
    fake_redis.delete(QUEUE_EVENTS)
    result = cli(env, "dlq", "replay", "--all", "--tenant", "acme", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"would replay {letters['rejected']}" in result.output
    assert f"would replay {letters['start']}" in result.output
    assert letters["beta"] not in result.output
    assert "2 dead letter(s) would be replayed" in result.output
    assert fake_redis.zcard(keys.DLQ_INDEX) == 3
    assert fake_redis.llen(QUEUE_EVENTS) == 0


def test_replay_ids_then_again(env: dict[str, str], letters: dict[str, str],
                               fake_redis: redis.Redis, rt: Runtime) -> None:
    fake_redis.delete(QUEUE_EVENTS)
    eid = letters["rejected"]
    result = cli(env, "dlq", "replay", eid)
    assert result.exit_code == 0, result.output
    assert "replayed 1 of 1" in result.output
    assert fake_redis.llen(QUEUE_EVENTS) == 1
    again = cli(env, "dlq", "replay", eid)
    assert "not in the dead-letter store" in again.output
    assert "replayed 0 of 0" in again.output
    assert fake_redis.llen(QUEUE_EVENTS) == 1
    assert process_event(rt, eid) == "delivered"


def test_replay_all_with_filters(env: dict[str, str], letters: dict[str, str],
                                 fake_redis: redis.Redis) -> None:
    fake_redis.delete(QUEUE_EVENTS)
    result = cli(env, "dlq", "replay", "--all", "--reason", "transform")
    assert result.exit_code == 0, result.output
    assert "replayed 2 of 2" in result.output
    left = json.loads(cli(env, "dlq", "list", "--json").output)
    assert [r["id"] for r in left] == [letters["rejected"]]
    assert fake_redis.llen(QUEUE_EVENTS) == 2


def test_replay_needs_ids_or_all(env: dict[str, str], letters: dict[str, str]) -> None:
    assert CliRunner().invoke(main, ["dlq", "replay"], env=env).exit_code == 2
    both = CliRunner().invoke(main, ["dlq", "replay", letters["beta"], "--all"], env=env)
    assert both.exit_code == 2


def test_delete(env: dict[str, str], letters: dict[str, str]) -> None:
    assert "deleted 1 of 1" in cli(env, "dlq", "delete", letters["beta"]).output
    dry = cli(env, "dlq", "delete", "--all", "--source", "callrail", "--dry-run")
    assert "2 dead letter(s) would be deleted" in dry.output
    assert len(json.loads(cli(env, "dlq", "list", "--json").output)) == 2
    assert "deleted 2 of 2" in cli(env, "dlq", "delete", "--all", "--tenant", "acme").output
    assert json.loads(cli(env, "dlq", "list", "--json").output) == []


def test_events_show_prints_the_timeline(env: dict[str, str], rt: Runtime,
                                         clock: FakeClock) -> None:
    assert isinstance(rt.rilla, FakeRilla)
    rt.rilla.fail(500)
    stored = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                  body=json.dumps(load("callrail", "post_call")).encode(),
                                  call_id=None)
    eid = stored.event_id
    assert process_event(rt, eid) == "retry_scheduled"
    clock.advance(rt.settings.retry_base_seconds)    # the first retry is due by then
    assert move_due_retries(rt) == 1
    assert process_event(rt, eid) == "delivered"
    text = cli(env, "events", "show", eid)
    assert text.exit_code == 0, text.output
    out = text.output
    assert eid in out and "status: delivered" in out
    for what in ("received", "attempt", "retry_scheduled", "delivered"):
        assert what in out
    assert "status=500" in out and "status=200" in out
    assert "2026-01-01 00:00:00  attempt" in out and "2026-01-01 00:00:05  delivered" in out
    as_json = json.loads(cli(env, "events", "show", eid, "--json").output)
    assert [e["what"] for e in as_json["timeline"]] == [
        "attempt", "retry_scheduled", "attempt", "delivered"]
    assert "body" not in as_json["event"] and "last_payload" not in as_json["event"]
    missing = CliRunner().invoke(main, ["events", "show", "ev_nope"], env=env)
    assert missing.exit_code != 0 and "no event ev_nope" in missing.output
