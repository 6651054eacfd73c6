"""Issue 4 end to end: CallRail API work behind the cluster-wide quota, with real processes.

Several Celery workers on the ``callrail`` queue and two scheduler copies run against the CallRail
sandbox, which enforces a scaled-down quota (rolling windows) and answers 429 when exceeded; the
guard gets identical settings through the environment. The logic is the production logic; only
the window lengths are shorter.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from rilla_bridge import keys
from rilla_bridge.clock import SystemClock
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.scripts import Scripts
from sandbox.callrail import make_call
from tests.system import BIN, System

pytestmark = pytest.mark.integration

ACCOUNT, API_KEY = "111111111", "acme-callrail-api-key-01"
HOURLY, DAILY, HOUR_S, DAY_S = 30, 300, 10, 100
QUOTA_ENV = {
    "CALLRAIL_HOURLY_LIMIT": str(HOURLY), "CALLRAIL_DAILY_LIMIT": str(DAILY),
    "CALLRAIL_HOUR_SECONDS": str(HOUR_S), "CALLRAIL_DAY_SECONDS": str(DAY_S),
    "CALLRAIL_PAUSE_BASE_SECONDS": "1",
    "RECONCILE_SETTLE_SECONDS": "0", "RECONCILE_INTERVAL_SECONDS": "3600",
}
SANDBOX_QUOTA = ("--hourly-limit", str(HOURLY), "--daily-limit", str(DAILY),
                 "--hour-seconds", str(HOUR_S), "--day-seconds", str(DAY_S))
OWN_DB = 12  # the pipeline system uses OWN_DB - 1: module fixtures overlap in time
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "callrail" / "post_call.json"


def guard(client: redis.Redis, **kw: Any) -> QuotaGuard:
    """The guard exactly as the processes build it from QUOTA_ENV (workers/callrail_jobs.py)."""
    opts: dict[str, Any] = {"hourly_limit": HOURLY, "daily_limit": DAILY,
                            "hour_seconds": HOUR_S, "day_seconds": DAY_S,
                            "shares": {"backfill": 0.5, "reconcile": 0.2},
                            "pause_base_seconds": 1.0}
    opts.update(kw)
    return QuotaGuard(client, Scripts(client), SystemClock(), **opts)


def cr(s: System, path: str, body: dict[str, Any] | None = None) -> Any:
    url = f"{s.callrail}/_sandbox/{path}"
    r = requests.post(url, json=body, timeout=5) if body is not None else requests.get(
        url, timeout=5)
    r.raise_for_status()
    return r.json()


def cr_account(s: System) -> dict[str, Any]:
    account: dict[str, Any] = cr(s, "stats?times=1")["by_account"][ACCOUNT]
    return account


def wait(pred: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def own_db(redis_url: str, db: int = OWN_DB) -> str:
    """The session's Redis server, but a database of this module's own.

    These tests run for seconds against live processes; a ``flushdb`` of the shared test
    database by a concurrently running test session would wipe the guard's counters mid-run.
    """
    base, _, tail = redis_url.rpartition("/")
    return f"{base}/{db}" if tail.isdigit() else redis_url


def start_system(s: System, client: redis.Redis, *, pipeline: bool) -> None:
    s.start_callrail_sandbox(*SANDBOX_QUOTA)
    cr(s, f"accounts/{ACCOUNT}", {"api_key": API_KEY, "calls": []})
    # Reconciliation starts only when a test asks for it (by deleting this marker).
    client.hset(keys.reconcile("acme"), mapping={"owner": "test",
                                                  "until": int((time.time() + 3600) * 1000)})
    if pipeline:    # the processes start side by side; ready() waits for them all
        s.start_rilla_sandbox(wait=False)
        s.start_web(wait=False)
        s.start_worker("worker", "events", 20, wait=False)
        s.start_history(wait=False)
    for i in range(3):
        s.start_worker(f"crworker{i}", "callrail", 10, wait=False)
    s.start_scheduler("scheduler1", wait=False)
    s.start_scheduler("scheduler2", wait=False)
    s.ready()


def settled(client: redis.Redis, g: QuotaGuard) -> bool:
    """Nothing left that could still reach Rilla or CallRail: no event pending, retrying or
    queued, no CallRail job waiting or queued, no message held by a worker (Celery acks late,
    after the outcome is stored)."""
    open_events = sum(int(client.zcard(k)) for k in client.scan_iter("rb:open:*"))
    with client.pipeline() as pipe:
        pipe.llen("events")
        pipe.llen("callrail")
        pipe.hlen("unacked")   # kombu's Redis transport: messages taken, not acked yet
        busy = open_events > 0 or any(pipe.execute())
    return not busy and not any(g.status(ACCOUNT)["waiting"].values())


@pytest.fixture(scope="module")
def quota_system(redis_url: str) -> Iterator[tuple[System, redis.Redis]]:
    url = own_db(redis_url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    s = System(url, env_extra=dict(QUOTA_ENV))
    try:
        start_system(s, client, pipeline=False)
        yield s, client
    finally:
        s.stop()
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def pipeline_system(redis_url: str) -> Iterator[tuple[System, redis.Redis]]:
    url = own_db(redis_url, OWN_DB - 1)
    client = redis.Redis.from_url(url)
    client.flushdb()
    s = System(url, env_extra=dict(QUOTA_ENV))
    try:
        start_system(s, client, pipeline=True)
        yield s, client
    finally:
        s.stop()
        client.flushdb()
        client.close()


def submit_counts(g: QuotaGuard, n: int, run: str) -> None:
    for _ in range(n):
        g.submit(ACCOUNT, "live", {"type": "count", "tenant": "acme", "run": run,
                                   "start_date": "2025-01-01", "end_date": "2025-01-02",
                                   "tries": 0})


def _hash(client: redis.Redis, key: Any) -> dict[bytes, bytes]:
    """HGETALL, typed: these tests' clients answer bytes."""
    found: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    return found


def bursts(times: list[float], gap: float = 0.5) -> list[float]:
    """Start times of the request bursts (a new burst after a quiet gap)."""
    return [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > gap]


# -- 1. no 429, >= 95% of the budget -----------------------------------------------------------
def test_backlog_across_processes_uses_the_budget_without_a_429(
        quota_system: tuple[System, redis.Redis]) -> None:
    s, client = quota_system
    g = guard(client)
    before = len(cr_account(s)["times"])
    cycles = 3
    submit_counts(g, HOURLY * (cycles + 4), "t1")  # more than the run can use: a real backlog
    # Bursts start one window (plus the guard's margin) apart; the first one is the workers'
    # warm-up (each builds its runtime on its first task) and is not measured.
    time.sleep((cycles + 1) * (HOUR_S + 0.2) + 0.6)
    acct = cr_account(s)
    log = acct["times"][before:]
    assert acct["served_429"] == 0, log
    times = sorted(t for t, _ in log)
    starts = bursts(times)
    assert len(starts) >= cycles + 2, starts
    # Steady state over whole cycles, from the second burst to the start of a later one:
    # CallRail allows HOURLY per HOUR_S of rolling window, so the span holds at most
    # HOURLY * span / HOUR_S requests.
    t0, t_end = starts[1], starts[1 + cycles]
    used = sum(1 for t in times if t0 <= t < t_end)
    budget = HOURLY * (t_end - t0) / HOUR_S
    use = used / budget
    # The most the guard itself may grant: every grant counts for one window + margin + bucket.
    own = HOURLY * (t_end - t0) / (HOUR_S + g.margin_seconds + HOUR_S / 360)
    print(f"\nbudget use {use:.1%} ({used} requests in {t_end - t0:.2f}s, CallRail budget "
          f"{budget:.1f}; guard's own ceiling {own:.1f}); 429s {acct['served_429']}; "
          f"burst starts {[round(b - t0, 2) for b in starts]}")
    assert use >= 0.95
    # no rolling window ever held more than HOURLY requests
    assert max(sum(1 for t in times if a <= t < a + HOUR_S) for a in times) <= HOURLY
    # several processes did the work, and both schedulers dispatched
    for i in range(3):
        assert '"msg": "callrail request"' in s.log(f"crworker{i}"), s.log(f"crworker{i}")[-2000:]
    st = g.status(ACCOUNT)
    assert st["hour_used"] <= HOURLY and st["waiting"]["live"] > 0  # still backlogged
    client.delete(g._k(ACCOUNT, "q:live"))  # drain the rest for the next test


# -- 2. a 429 pauses every process; work resumes -------------------------------------------
def test_a_forced_429_pauses_the_account_for_every_process_and_work_resumes(
        quota_system: tuple[System, redis.Redis]) -> None:
    s, client = quota_system
    g = guard(client)
    # Let the previous test's grants expire so the budget is not what stops requests here.
    wait(lambda: g.status(ACCOUNT)["hour_used"] == 0, HOUR_S + 3, "budget to free")
    before = cr_account(s)
    cr(s, "force_429", {"account_id": ACCOUNT, "count": 1})
    submit_counts(g, 20, "t2")
    paused_until = wait(lambda: g.status(ACCOUNT)["paused_until"], 5, "the pause", 0.01)
    seen_at = time.time()
    pause_len = paused_until - seen_at
    assert 0.5 <= pause_len <= 1.2
    wait(lambda: g.status(ACCOUNT)["paused_until"] is None, 5, "pause to end", 0.02)
    wait(lambda: g.status(ACCOUNT)["waiting"]["live"] == 0
         and cr_account(s)["requests"] - before["requests"] >= 21, 15, "work to resume")
    acct = cr_account(s)
    log = acct["times"][len(before["times"]):]
    assert acct["served_429"] - before["served_429"] == 1
    t429 = next(t for t, status in log if status == 429)
    # Nothing reached CallRail from any process while the pause was on (requests already in
    # flight when the 429 came back may land within a few ms of it).
    during = [t for t, _ in log if t429 + 0.05 < t < paused_until]
    assert during == [], (during, t429, paused_until)
    after = [t for t, status in log if t >= paused_until and status == 200]
    ok = [t for t, status in log if status == 200]
    assert len(ok) == 20 and len(after) >= 1  # every job done once, the 429'd one included
    print(f"\n429 at +0, pause {pause_len + (seen_at - t429):.2f}s, first request after it "
          f"+{min(after) - t429:.2f}s, {len(after)} after the pause")
    assert g.status(ACCOUNT)["pause_level"] == 0  # success after the pause reset the level


# -- 3. reconciliation ----------------------------------------------------------------------
def webhook(call: dict[str, Any], recording: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(FIXTURE.read_text())
    body.update({"resource_id": call["id"], "start_time": call["start_time"],
                 "created_at": call["created_at"], "timestamp": call["start_time"],
                 "recording": recording if recording is not None else call["recording_redirect"],
                 "recording_player": call["recording_player"]})
    return body


def appointments(s: System) -> dict[str, dict[str, Any]]:
    return {a["event_id"]: a for a in s.sandbox("appointments")}


def reconcile_now(s: System, client: redis.Redis) -> None:
    client.delete("rb:recon:acme")  # the scheduler's reconcile job (every 5 s) starts a run
    wait(lambda: client.exists("rb:recon:acme"), 10, "a reconciliation run to start")


def test_reconciliation_delivers_a_missed_call_once_and_skips_a_call_its_webhook_brought(
        pipeline_system: tuple[System, redis.Redis]) -> None:
    s, client = pipeline_system
    missed, arrived = make_call(), make_call()
    cr(s, f"accounts/{ACCOUNT}", {"calls": [missed, arrived]})
    r = s.post_callrail("acme", webhook(arrived), event="post_call")
    assert r.status_code in (200, 202), r.text
    arrived_id, missed_id = f"callrail-{arrived['id']}", f"callrail-{missed['id']}"
    wait(lambda: arrived_id in appointments(s), 15, "the webhook's call to be delivered")
    reconcile_now(s, client)
    wait(lambda: missed_id in appointments(s), 20, "reconciliation to deliver the missed call")
    got = appointments(s)[missed_id]
    assert got["media_url"] == missed["recording_redirect"]  # resolved via recording.json
    wait(lambda: settled(client, guard(client)), 10, "nothing left in flight")
    upserts = s.sandbox("stats")["upserts_by_event"]
    assert upserts[arrived_id] == 1, upserts
    assert upserts[missed_id] == 1, upserts
    runs = [k for k in client.scan_iter("rb:run:reconcile-acme-*")]
    info = {k.decode(): v.decode() for k, v in _hash(client, runs[-1]).items()}
    assert info["done"] == "1" and int(info["fed"]) >= 1


# -- 4. recording.json webhooks --------------------------------------------------------------
def test_an_api_recording_url_is_resolved_before_delivery_and_without_api_key_dead_letters(
        pipeline_system: tuple[System, redis.Redis]) -> None:
    s, _ = pipeline_system
    call = make_call()
    cr(s, f"accounts/{ACCOUNT}", {"calls": [call]})
    api_url = f"{s.callrail}/v3/a/{ACCOUNT}/calls/{call['id']}/recording.json"
    before = cr_account(s)["requests"]
    r = s.post_callrail("acme", webhook(call, api_url), event="post_call")
    assert r.status_code in (200, 202), r.text
    eid = f"callrail-{call['id']}"
    wait(lambda: eid in appointments(s), 15, "the call to be delivered")
    assert appointments(s)[eid]["media_url"] == call["recording_redirect"]
    assert cr_account(s)["requests"] - before == 1  # one recording.json lookup, nothing else
    event_id = r.json()["id"]
    wait(lambda: s.history.status(event_id) == "delivered", 10, "the event's status")
    timeline = s.history.timeline(event_id)
    assert "waiting_recording" in timeline and timeline[-1] == "delivered", timeline

    other = make_call()
    api_url = f"{s.callrail}/v3/a/222222222/calls/{other['id']}/recording.json"
    r = s.post_callrail("beta", webhook(other, api_url), event="post_call")
    assert r.status_code in (200, 202), r.text
    event_id = r.json()["id"]
    wait(lambda: s.history.status(event_id) == "dead", 15, "the dead letter")
    found = s.history.event(event_id)
    assert found is not None
    reason = str(found["event"]["reason"])
    assert "recording.json" in reason and "'beta'" in reason and "api_key" in reason, reason
    assert f"callrail-{other['id']}" not in appointments(s)


# -- 6. CLI -----------------------------------------------------------------------------------
def cli(s: System, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rilla-bridge"), *args], env=s.env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_quota_command_and_backfill_feed_calls_no_webhook_brought(
        pipeline_system: tuple[System, redis.Redis]) -> None:
    s, client = pipeline_system
    old = datetime.now(UTC) - timedelta(days=10)  # outside reconciliation's look-back
    calls = [make_call(start_time=old + timedelta(minutes=i)) for i in range(3)]
    cr(s, f"accounts/{ACCOUNT}", {"calls": calls})
    since = (old - timedelta(hours=1)).isoformat(timespec="seconds")
    until = (old + timedelta(hours=1)).isoformat(timespec="seconds")
    done = cli(s, "backfill", "--tenant", "acme", "--since", since, "--until", until, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "3 call(s) between" in out
    assert out.index("estimated budget: 1 list request(s) + up to 3") < out.index("queued")
    assert "done: 3 call(s) listed, 3 new ones" in out, out
    for c in calls:
        wait(lambda c=c: f"callrail-{c['id']}" in appointments(s), 20, "backfilled calls")
        assert appointments(s)[f"callrail-{c['id']}"]["media_url"] == c["recording_redirect"]

    wait(lambda: client.llen("callrail") == 0, 10, "the callrail queue to drain")
    shown = cli(s, "quota")
    assert shown.returncode == 0, shown.stderr
    assert f"CallRail account {ACCOUNT}: not paused; limits {HOURLY}/hour, {DAILY}/day" in (
        shown.stdout)
    table = {line.split()[0]: [int(x) for x in line.split()[1:]]
             for line in shown.stdout.splitlines()[2:] if line.strip()}
    hour_used, hour_left, day_used, day_left, _ = table["total"]
    assert hour_used + hour_left == HOURLY and day_used + day_left == DAILY
    # count + list + 3 recording lookups at least, all within the (30 s) day
    assert day_used >= 5 and table["backfill"][2] >= 5, shown.stdout
    assert [table[lane][4] for lane in ("live", "backfill", "reconcile")] == [0, 0, 0]
    rows = json.loads(cli(s, "quota", "--json").stdout)
    assert [r["account"] for r in rows] == [ACCOUNT]
    assert rows[0]["lanes"]["backfill"]["day_used"] >= 5


# -- 5. live lookups go first ------------------------------------------------------------------
def test_live_lookups_are_granted_before_reconciliation_when_the_window_frees(
        redis_url: str) -> None:
    client = redis.Redis.from_url(own_db(redis_url))
    prefix = f"t5:{time.time_ns()}"
    g = guard(client, hourly_limit=4, hour_seconds=2, margin_seconds=0.0,
              shares={"reconcile": 1.0}, prefix=prefix)
    for i in range(4):
        g.submit("9", "live", {"n": f"first{i}"})
    assert len(g.take("9", 10)) == 4  # the budget is exhausted
    for i in range(3):  # reconciliation queued first, then live work arrives
        g.submit("9", "reconcile", {"n": f"rec{i}"})
    for i in range(3):
        g.submit("9", "live", {"n": f"live{i}"})
    assert g.take("9", 10) == []
    wait_s = g.next_grant_in("9")
    assert wait_s is not None and 1.5 < wait_s <= 2.1
    time.sleep(wait_s + 0.02)
    granted = g.take("9", 10)
    assert [j["lane"] for j in granted] == ["live", "live", "live", "reconcile"]
    assert [j["n"] for j in granted] == ["live0", "live1", "live2", "rec0"]
    assert g.status("9")["waiting"] == {"live": 0, "backfill": 0, "reconcile": 2}
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()
