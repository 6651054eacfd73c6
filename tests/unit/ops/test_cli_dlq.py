"""``rilla-bridge dlq replay|delete`` (``ops/cli/dlq.py``): both select the dead letters from
the history database and act through ``rilla_bridge.operations.Operations``. The dead letters
are made by a worker runtime on fakeredis and a ``FakeClock``, land in the ``rb:history``
stream and reach a SQLite history through the history process
(``workers.history.HistoryProcess.step``), as in production; the command line's Redis client
and clock are the test's. ``dlq list|show`` and ``events`` have their own tests in
``test_cli_history.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from ops.cli import common, main
from ops.cli import dlq as dlq_cli
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db
from rilla_bridge.history.models import audit_log, dead_letters, events
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import Outcome
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import ACME_KEY, BETA_KEY, TENANTS, FakeRilla, load, make_runtime
from workers.history import HistoryProcess
from workers.pipeline import process_event
from workers.runtime import Runtime

SECRETS = (ACME_KEY, BETA_KEY, "acme-signing-key-0001", "beta-signing-key-0002",
           "beta-callingly-token-02")
OPERATOR = "cli:test-operator"


@pytest.fixture
def env(fake_redis: redis.Redis, history_db: Engine, clock: FakeClock, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)
    monkeypatch.setattr(dlq_cli, "SystemClock", lambda: clock)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(tenants),
            "DATABASE_URL": history_db.url.render_as_string(),
            "RILLA_BRIDGE_OPERATOR": OPERATOR}


@pytest.fixture
def rt(fake_redis: redis.Redis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock)


@pytest.fixture
def history(fake_redis: redis.Redis, history_db: Engine, clock: FakeClock
            ) -> Iterator[HistoryProcess]:
    yield HistoryProcess(Settings(), fake_redis, history_db, parse_tenants(TENANTS, env={}),
                         clock, consumer="test", block_ms=None)


def drain(history: HistoryProcess) -> int:
    """Write everything waiting in the ``rb:history`` stream to SQL (the history process)."""
    total = 0
    while written := history.step():
        total += written
    assert history.redis.xlen(keys.HISTORY) == 0
    return total


def cli(env: dict[str, str], *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    for secret in SECRETS:
        assert secret not in result.output, args
    assert (result.exit_code == 0) == ok, result.output
    return result


def take(client: redis.Redis) -> str:
    raw = client.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes)
    return str((message_args(raw) or [""])[0])


def dead(rt: Runtime, body: dict[str, Any], *, tenant: str = "acme", source: str = "callrail",
         kind: str = "post_call", answer: RillaResult | None = None) -> str:
    """A webhook stored as intake does and run by a worker until it is dead-lettered."""
    assert isinstance(rt.rilla, FakeRilla)
    if answer is not None:
        rt.rilla.script = [answer]
    stored = rt.lifecycle.receive(source=source, tenant=tenant, kind=kind,
                                  body=json.dumps(body).encode(), call_id=None)
    assert take(rt.redis) == stored.event_id                # a worker takes its message
    assert process_event(rt, stored.event_id, tenant) == Outcome.DEAD
    rt.clock.sleep(1)
    return stored.event_id


@pytest.fixture
def letters(rt: Runtime, history: HistoryProcess) -> dict[str, str]:
    post = load("callrail", "post_call")
    cg = load("callingly", "call_completed")
    made = {
        # Rilla's body echoes the key: it must never reach the terminal.
        "rejected": dead(rt, post, answer=RillaResult(
            "permanent", 422, f"API key {ACME_KEY} is not in Rilla")),
        "start": dead(rt, {**post, "resource_id": "CAL" + "2" * 32, "start_time": "later",
                           "datetime": ""}),
        "beta": dead(rt, {**cg, "user": {**cg["user"], "email": None}}, tenant="beta",
                     source="callingly", kind="call_completed"),
    }
    assert drain(history) > 0
    assert rt.store.get(made["rejected"]) is None     # finished: only history has them now
    return made


def open_letters(env: dict[str, str]) -> list[str]:
    return [r["id"] for r in json.loads(cli(env, "dlq", "list", "--json").output)]


def stream(client: redis.Redis) -> list[Record]:
    entries: Any = client.xrange(keys.HISTORY)
    return [Record.from_entry(sid, f) for sid, f in entries]


def queued(client: redis.Redis) -> list[str]:
    """Event ids on the events queue, in the order workers take them."""
    raw: list[bytes] = client.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [str((message_args(m) or [""])[0]) for m in reversed(raw)]


def rows(engine: Engine, table: Any, **where: Any) -> list[dict[str, Any]]:
    with db.reading(engine) as conn:
        query = sa.select(table).where(*(table.c[k] == v for k, v in where.items()))
        return [dict(r) for r in conn.execute(query).mappings()]


# -- replay ---------------------------------------------------------------------------------
def test_replay_dry_run_changes_nothing(env: dict[str, str], letters: dict[str, str],
                                        fake_redis: redis.Redis, history_db: Engine) -> None:
    result = cli(env, "dlq", "replay", "--all", "--tenant", "acme", "--dry-run")
    assert f"would replay {letters['rejected']}  acme  rilla_rejected: Rilla answered 422: " \
           "API key [Filtered] is not in Rilla" in result.output
    assert f"would replay {letters['start']}  acme  transform: no usable start time" in (
        result.output)
    assert letters["beta"] not in result.output
    assert "dry run: 2 dead letter(s) would be replayed" in result.output
    assert fake_redis.keys(keys.event("*")) == [] and queued(fake_redis) == []
    assert stream(fake_redis) == []                  # no history record, no audit entry
    assert rows(history_db, audit_log) == []
    assert open_letters(env) == [letters["rejected"], letters["start"], letters["beta"]]


def test_replay_ids_then_again(env: dict[str, str], letters: dict[str, str],
                               fake_redis: redis.Redis, history: HistoryProcess,
                               history_db: Engine, rt: Runtime) -> None:
    eid = letters["rejected"]
    result = cli(env, "dlq", "replay", eid)
    assert "replayed 1 of 1 dead letter(s)" in result.output
    # The raw event is back in Redis from history, queued through acme's bulk lane.
    event = rt.store.get(eid)
    assert event is not None and event["lane"] == "replay" and event["tenant"] == "acme"
    assert json.loads(event["body"])["resource_id"] == load("callrail", "post_call")[
        "resource_id"]
    assert queued(fake_redis) == [eid]
    assert [r.type for r in stream(fake_redis)] == ["step", "handled", "audit"]
    # Again before the history process wrote that: history still says open, Redis says no.
    again = cli(env, "dlq", "replay", eid)
    assert f"{eid}: not replayed: in progress, or replayed within the hour" in again.output
    assert "replayed 0 of 1 dead letter(s)" in again.output
    assert queued(fake_redis) == [eid]
    drain(history)
    # Again once history has it: not an open dead letter any more.
    third = cli(env, "dlq", "replay", eid)
    assert f"{eid}: not an open dead letter (replayed or deleted already?)" in third.output
    assert "replayed 0 of 0 dead letter(s)" in third.output
    (letter,) = rows(history_db, dead_letters, event_id=eid)
    assert (letter["handled_how"], letter["handled_by"]) == ("replayed", OPERATOR)
    assert open_letters(env) == [letters["start"], letters["beta"]]
    # A worker runs it with today's data: Rilla takes it this time.
    assert take(fake_redis) == eid
    assert process_event(rt, eid, "acme") == Outcome.DELIVERED
    drain(history)
    (row,) = rows(history_db, events, id=eid)
    assert row["status"] == "delivered" and row["reason"] is None
    audits = rows(history_db, audit_log)
    assert [(a["actor"], a["action"], a["count"]) for a in audits] == [
        (OPERATOR, "dlq.replay", 1), (OPERATOR, "dlq.replay", 0), (OPERATOR, "dlq.replay", 0)]
    assert audits[0]["selection"] == {"ids": [eid], "count": 1}


def test_replay_all_with_filters(env: dict[str, str], letters: dict[str, str],
                                 fake_redis: redis.Redis, history: HistoryProcess,
                                 rt: Runtime) -> None:
    result = cli(env, "dlq", "replay", "--all", "--reason", "transform")
    assert "replayed 2 of 2 dead letter(s)" in result.output
    assert sorted(queued(fake_redis)) == sorted([letters["start"], letters["beta"]])
    drain(history)
    assert open_letters(env) == [letters["rejected"]]
    # They run with the tenants file as it is now: both still fail (beta's call has no rep,
    # the other no start time), each a new dead letter of the same event.
    ran = []
    while queued(fake_redis):
        eid = take(fake_redis)
        event = rt.store.get(eid)
        assert event is not None
        assert process_event(rt, eid, event["tenant"]) == Outcome.DEAD
        ran.append(eid)
        rt.clock.sleep(1)
    drain(history)
    assert open_letters(env) == [letters["rejected"], *ran]


def test_replay_of_unknown_or_finished_events_replays_nothing(
        env: dict[str, str], letters: dict[str, str], fake_redis: redis.Redis) -> None:
    result = cli(env, "dlq", "replay", "ev_nope", letters["beta"], "--tenant", "acme")
    assert "ev_nope: not an open dead letter" in result.output
    assert "replayed 0 of 0 dead letter(s)" in result.output      # beta's is not acme's
    assert queued(fake_redis) == [] and fake_redis.keys(keys.event("*")) == []


def test_replay_needs_ids_or_all(env: dict[str, str], letters: dict[str, str]) -> None:
    neither = CliRunner().invoke(main, ["dlq", "replay"], env=env)
    assert neither.exit_code == 2 and "give one or more IDs, or --all" in neither.output
    both = CliRunner().invoke(main, ["dlq", "replay", letters["beta"], "--all"], env=env)
    assert both.exit_code == 2 and "give IDs or --all, not both" in both.output


# -- delete ---------------------------------------------------------------------------------
def test_delete(env: dict[str, str], letters: dict[str, str], fake_redis: redis.Redis,
                history: HistoryProcess, history_db: Engine) -> None:
    assert "deleted 1 of 1 dead letter(s)" in cli(env, "dlq", "delete", letters["beta"]).output
    assert [r.type for r in stream(fake_redis)] == ["handled", "audit"]
    assert fake_redis.keys(keys.event("*")) == [] and queued(fake_redis) == []   # not run
    drain(history)
    dry = cli(env, "dlq", "delete", "--all", "--source", "callrail", "--dry-run")
    assert "dry run: 2 dead letter(s) would be deleted" in dry.output
    assert open_letters(env) == [letters["rejected"], letters["start"]]
    assert "deleted 2 of 2 dead letter(s)" in cli(env, "dlq", "delete", "--all", "--tenant",
                                                  "acme").output
    drain(history)
    assert open_letters(env) == []
    # History keeps the events and their closed dead letters.
    for eid in letters.values():
        (letter,) = rows(history_db, dead_letters, event_id=eid)
        assert (letter["handled_how"], letter["handled_by"]) == ("deleted", OPERATOR)
        assert rows(history_db, events, id=eid)[0]["status"] == "dead"
    assert [(a["action"], a["count"]) for a in rows(history_db, audit_log)] == [
        ("dlq.delete", 1), ("dlq.delete", 2)]
    # A deleted dead letter is not replayed.
    again = cli(env, "dlq", "replay", letters["rejected"])
    assert "not an open dead letter" in again.output and "replayed 0 of 0" in again.output


# -- a replay while a worker runs an older tenants file ------------------------------------------
def _worker_running(text: str, fake_redis: redis.Redis, clock: FakeClock, tmp_path: Path,
                    process: str = "worker") -> None:
    """A worker process that reports running the tenants configuration ``text``."""
    from rilla_bridge.tenant_config import LiveTenants, TenantsReloader, load_config

    path = tmp_path / f"{process}-tenants.toml"
    path.write_text(text)
    settings = Settings(tenants_file=str(path))
    reloader = TenantsReloader(settings, LiveTenants(load_config(settings, env={})), clock,
                               client=fake_redis, process=process, env={})
    reloader.member += process
    reloader.report()


def test_replay_warns_and_asks_while_a_worker_runs_an_older_file(
        env: dict[str, str], letters: dict[str, str], fake_redis: redis.Redis,
        clock: FakeClock, tmp_path: Path) -> None:
    eid = letters["rejected"]
    _worker_running(TENANTS, fake_redis, clock, tmp_path, "callrail")     # up to date
    _worker_running(TENANTS + "\n# before the fix\n", fake_redis, clock, tmp_path)
    refused = CliRunner().invoke(main, ["dlq", "replay", eid], env=env, input="n\n")
    assert refused.exit_code == 1, refused.output
    assert "1 of 2 worker(s) still run another tenants configuration" in refused.output
    assert "replay not started (use --yes to replay anyway)" in refused.output
    assert queued(fake_redis) == [] and open_letters(env)[0] == eid
    forced = cli(env, "dlq", "replay", eid, "--yes")
    assert "still run another tenants configuration" in forced.output   # still said
    assert "replayed 1 of 1 dead letter(s)" in forced.output and queued(fake_redis) == [eid]


def test_replay_does_not_ask_when_every_worker_runs_this_file(
        env: dict[str, str], letters: dict[str, str], fake_redis: redis.Redis,
        clock: FakeClock, tmp_path: Path) -> None:
    _worker_running(TENANTS, fake_redis, clock, tmp_path)
    result = cli(env, "dlq", "replay", letters["rejected"])
    assert "warning" not in result.output and "replayed 1 of 1" in result.output


def test_replay_wait_follows_to_the_outcomes(env: dict[str, str], letters: dict[str, str],
                                             fake_redis: redis.Redis, clock: FakeClock,
                                             history: HistoryProcess, rt: Runtime,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``--wait``: the workers run the replayed events (here: while the command sleeps), and
    the command lists how each ended; one died again (its start time is still unusable), so
    the exit status is 1."""
    def working_sleep(seconds: float) -> None:
        clock.advance(seconds)
        while queued(fake_redis):
            eid = take(fake_redis)
            event = rt.store.get(eid)
            assert event is not None
            process_event(rt, eid, event["tenant"])
        drain(history)

    monkeypatch.setattr(clock, "sleep", working_sleep)
    _worker_running(TENANTS, fake_redis, clock, Path(env["TENANTS_FILE"]).parent)
    fixed, broken = letters["rejected"], letters["start"]
    result = CliRunner().invoke(main, ["dlq", "replay", fixed, broken, "--wait"], env=env)
    assert result.exit_code == 1, result.output
    assert "replayed 2 of 2 dead letter(s)" in result.output
    assert "finished 2 of 2" in result.output            # plain progress: not a terminal
    assert f"{broken}: dead again: transform: no usable start time" in result.output
    assert fixed + ":" not in result.output               # delivered ones are only counted
    assert result.output.strip().endswith("outcomes: 1 delivered, 1 dead again, 0 skipped")
    for secret in SECRETS:
        assert secret not in result.output


# -- a replay that meets a lane that does not drain ---------------------------------------------

def _full_bulk_lane(client: redis.Redis, tenant: str) -> None:
    """The tenant's bulk lane holding the few seconds of work a replay feeds ahead."""
    client.rpush(keys.bulk_lane(tenant), *[f"ev_waiting{i}" for i in range(200)])


def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(_: float) -> None:
        raise AssertionError("the replay waited for a lane that does not drain")

    monkeypatch.setattr("rilla_bridge.operations.time.sleep", never)


def test_a_paused_tenants_replay_is_queued_at_once_not_waited_for(
        letters: dict[str, str], fake_redis: redis.Redis, history_db: Engine, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from rilla_bridge.operations import Operations

    ops = Operations(Settings(), fake_redis, history_db, clock, parse_tenants(TENANTS, env={}))
    ops.lifecycle.lanes.pause("acme")
    _full_bulk_lane(fake_redis, "acme")
    _no_waiting(monkeypatch)
    result = ops.replay([letters["rejected"]], "cli:test")
    assert result.done == 1 and result.left == []
    assert fake_redis.lindex(keys.bulk_lane("acme"), -1) == letters["rejected"].encode()


def test_a_replay_waiting_for_room_sees_its_cancel(
        letters: dict[str, str], fake_redis: redis.Redis, history_db: Engine, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from rilla_bridge.operations import Operations

    ops = Operations(Settings(), fake_redis, history_db, clock, parse_tenants(TENANTS, env={}))
    _full_bulk_lane(fake_redis, "acme")
    _no_waiting(monkeypatch)
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 1        # cancelled while it waits for room

    result = ops.replay([letters["rejected"], letters["start"]], "cli:test",
                        cancelled=cancelled)
    assert result.done == 0
    assert result.left == [(letters["rejected"], "cancelled"), (letters["start"], "cancelled")]


def test_a_pause_through_another_web_process_shows_at_once(
        fake_redis: redis.Redis, history_db: Engine, clock: FakeClock) -> None:
    """Each web process caches the overview for a few seconds; which tenants are paused is
    read fresh, so an operator never sees a pause undone (or done) by another process late."""
    from rilla_bridge.operations import Operations

    one, other = (Operations(Settings(), fake_redis, history_db, clock,
                             parse_tenants(TENANTS, env={})) for _ in range(2))
    assert not any(r["paused"] for r in one.overview()["tenants"])    # cached now
    other.pause("acme", "console:test")
    assert [r["tenant"] for r in one.overview()["tenants"] if r["paused"]] == ["acme"]
    assert one.overview()["paused"] == ["acme"]
    assert {t["tenant"]: t["paused"] for t in one.tenants_info("https://x")}["acme"]
    other.resume("acme", "console:test")
    assert not any(t["paused"] for t in one.tenants_info("https://x"))
