"""The scheduler (``workers/scheduler.py``): the lanes job (due retries, lapsed leases, the
shared refill) through ``tick`` with its job leases, several scheduler copies running each job
once per tick, and its loop, all on the runtime's clock (a ``FakeClock`` here)."""

from __future__ import annotations

import json
import logging
import signal
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from sqlalchemy.engine import Engine

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import overview
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import ClaimCode, Outcome, Status
from rilla_bridge.operations import OVERVIEW_CACHE_SECONDS, OVERVIEW_FRESH_SECONDS, Operations
from tests.fakes import load, make_runtime
from workers import callrail_jobs, scheduler
from workers.pipeline import process_event
from workers.runtime import Runtime
from workers.scheduler import Job

LEASE = 8.0                    # DELIVERY_LEASE_SECONDS (the default)
DISPATCH_LEASE = 60 + 15       # a dispatched, unclaimed event's lease


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock)


def ingest(rt: Runtime, body: dict[str, Any], tenant: str = "acme") -> str:
    stored = rt.lifecycle.receive(source="callrail", tenant=tenant, kind="post_call",
                                  body=json.dumps(body).encode(), call_id=None)
    return stored.event_id


def call(n: int) -> dict[str, Any]:
    return {**load("callrail", "post_call"), "resource_id": f"CAL{n:032x}"}


def queued_ids(rt: Runtime) -> list[str]:
    """The queue's event ids in the order workers take them."""
    raw: list[bytes] = rt.redis.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [str((message_args(m) or [""])[0]) for m in reversed(raw)]


def retry_later(rt: Runtime, eid: str, delay: float, worker: str = "w1") -> None:
    """A worker ran ``eid`` and scheduled its retry in ``delay`` seconds."""
    claim = rt.lifecycle.claim(eid, "acme", worker)
    assert claim.event is not None
    rt.lifecycle.retry(claim.event, delay, Status.RETRY_SCHEDULED, Outcome.RETRY, [],
                       worker=worker)


def requeued_steps(rt: Runtime, eid: str) -> int:
    entries: Any = rt.redis.xrange(keys.HISTORY)
    return sum(1 for sid, f in entries
               if (r := Record.from_entry(sid, f)).type == "step" and r.data["id"] == eid
               and [e["what"] for e in r.data["tl"]] == ["requeued"])


def lanes_only() -> list[Job]:
    return [j for j in scheduler.default_jobs() if j.name == "lanes"]


# -- the lanes job ---------------------------------------------------------------------------

def test_the_lanes_job_moves_only_due_retries_once(rt: Runtime, clock: FakeClock) -> None:
    due_id, later_id = ingest(rt, call(1)), ingest(rt, call(2))
    rt.redis.delete(QUEUE_EVENTS)
    retry_later(rt, due_id, 5)
    retry_later(rt, later_id, 600)
    assert scheduler.sweep_lanes(rt) == 0              # nothing is due yet
    clock.advance(5)
    assert scheduler.sweep_lanes(rt) == 1
    assert scheduler.sweep_lanes(rt) == 0              # moved once
    assert queued_ids(rt) == [due_id]
    assert rt.redis.zscore(keys.retry("acme"), due_id) is None
    assert rt.redis.zscore(keys.retry("acme"), later_id) == clock.now() + 595
    assert rt.redis.zscore(keys.inflight("acme"), due_id) is not None


def test_a_retry_of_an_event_finished_meanwhile_is_dropped(rt: Runtime,
                                                           clock: FakeClock) -> None:
    """A failed recording lookup dead-letters an event that waits for its retry."""
    eid = ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)
    retry_later(rt, eid, 3600)
    event = rt.store.get(eid)
    assert event is not None
    rt.lifecycle.dead_letter(event, "recording_lookup", "CallRail answered 404", worker="cr")
    assert rt.redis.zcard(keys.retry("acme")) == 0
    clock.advance(3600)
    assert scheduler.sweep_lanes(rt) == 0 and queued_ids(rt) == []


def test_the_lanes_job_recovers_a_dead_workers_event(rt: Runtime, clock: FakeClock,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    eid = ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)                       # taken by a worker...
    assert rt.lifecycle.claim(eid, "acme", "dead-worker").code == ClaimCode.CLAIMED
    clock.advance(LEASE - 0.001)                        # ...which dies: no heartbeat
    assert scheduler.sweep_lanes(rt) == 0
    clock.advance(0.001)
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.scheduler"):
        assert scheduler.sweep_lanes(rt) == 1
    assert queued_ids(rt) == [eid] and requeued_steps(rt, eid) == 1
    (line,) = [r for r in caplog.records if r.name == "rilla_bridge.scheduler"]
    assert line.getMessage() == "recovered events whose worker stopped"
    assert line.count == 1                               # type: ignore[attr-defined]
    assert process_event(rt, eid, "acme") == Outcome.DELIVERED


def test_a_lost_message_is_recovered_after_the_dispatch_lease(rt: Runtime,
                                                              clock: FakeClock) -> None:
    eid = ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)                       # the message is lost
    clock.advance(DISPATCH_LEASE - 1)
    assert scheduler.sweep_lanes(rt) == 0
    clock.advance(1)
    assert scheduler.sweep_lanes(rt) == 1
    assert queued_ids(rt) == [eid]


def test_the_lanes_job_refills_the_queue_in_turn(fake_redis: fakeredis.FakeRedis,
                                                 clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock, dispatch_queue_max=2)
    ids = [ingest(rt, call(n)) for n in range(4)]
    assert queued_ids(rt) == ids[:1]
    assert scheduler.sweep_lanes(rt) == 1
    assert queued_ids(rt) == ids[:2]
    rt.redis.rpop(QUEUE_EVENTS)
    rt.redis.rpop(QUEUE_EVENTS)
    assert scheduler.sweep_lanes(rt) == 2
    assert queued_ids(rt) == ids[2:]


# -- jobs, leases and the loop ----------------------------------------------------------------

def counting(name: str, every: float, runs: list[tuple[str, float]],
             label: str = "") -> Job:
    """Job ``name`` that notes (``label`` or its name, the time) on each run."""
    def run(r: Runtime) -> int:
        runs.append((label or name, r.clock.now()))
        return 1
    return Job(name, every, run)


def test_each_job_runs_in_one_copy_per_turn(rt: Runtime, clock: FakeClock) -> None:
    runs: list[tuple[str, float]] = []
    a = [counting("retries", 0.5, runs, "a")]     # the same job in two scheduler copies
    b = [counting("retries", 0.5, runs, "b")]
    t0 = clock.now()
    scheduler.tick(rt, a, "node-a")
    scheduler.tick(rt, b, "node-b")   # the lease is node-a's this turn
    assert len(runs) == 1
    clock.advance(0.25)
    scheduler.tick(rt, a, "node-a")   # not its time yet
    scheduler.tick(rt, b, "node-b")   # its time, but node-a's lease still runs
    assert len(runs) == 1
    clock.advance(0.25)
    scheduler.tick(rt, b, "node-b")   # node-a's lease lapsed: node-b takes this turn
    scheduler.tick(rt, a, "node-a")
    assert [(who, t - t0) for who, t in runs] == [("a", 0.0), ("b", 0.5)]
    assert rt.redis.hget(keys.scheduler_job("retries"), "owner") == b"node-b"


def test_two_scheduler_copies_sweep_the_lanes_once_per_tick(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    sweeps: list[str] = []
    real = rt.lanes.sweep

    def sweep() -> tuple[int, int, int]:
        sweeps.append("sweep")
        return real()

    monkeypatch.setattr(rt.lanes, "sweep", sweep)
    lost = ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)
    assert rt.lifecycle.claim(lost, "acme", "dead-worker").code == ClaimCode.CLAIMED
    copies = [(lanes_only(), "node-a"), (lanes_only(), "node-b")]
    for _ in range(40):                                # ten seconds of 0.25 s ticks
        for jobs, node in copies:
            scheduler.tick(rt, jobs, node)
        clock.advance(0.25)
    assert len(sweeps) == 40
    # The dead worker's event came back once, not once per copy.
    assert queued_ids(rt) == [lost] and requeued_steps(rt, lost) == 1


def test_a_failing_job_does_not_stop_the_others(rt: Runtime,
                                                caplog: pytest.LogCaptureFixture) -> None:
    runs: list[tuple[str, float]] = []

    def crash(r: Runtime) -> int:
        raise RuntimeError("boom")

    def redis_down(r: Runtime) -> int:
        raise redis.ConnectionError("gone")

    jobs = [Job("crash", 1.0, crash), Job("redis", 1.0, redis_down),
            counting("fine", 1.0, runs)]
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.scheduler"):
        scheduler.tick(rt, jobs, "node")
    assert [name for name, _ in runs] == ["fine"]
    messages = {(r.getMessage(), getattr(r, "job", None)) for r in caplog.records}
    assert ("scheduler job crashed", "crash") in messages
    assert ("scheduler job failed", "redis") in messages


def test_run_forever_sleeps_on_the_runtimes_clock_until_told_to_stop(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, Callable[..., None]] = {}
    monkeypatch.setattr(signal, "signal",
                        lambda signum, handler: handlers.__setitem__(signum, handler))
    runs: list[tuple[str, float]] = []
    t0 = clock.now()

    def every_second(r: Runtime) -> int:
        runs.append(("job", r.clock.now()))
        if len(runs) == 5:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return 1

    scheduler.run_forever(rt, [Job("job", 1.0, every_second)], interval=0.25)
    assert [t - t0 for _, t in runs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert clock.now() - t0 == 4.25          # one more sleep after the SIGTERM, then out
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT}


def test_default_jobs() -> None:
    jobs = {j.name: j for j in scheduler.default_jobs()}
    assert set(jobs) == {"lanes", "callrail_dispatch", "reconcile", "overview"}
    assert jobs["lanes"].run is scheduler.sweep_lanes and jobs["lanes"].every == 0.25
    assert jobs["callrail_dispatch"].run is callrail_jobs.dispatch
    assert jobs["reconcile"].run is callrail_jobs.reconcile
    assert isinstance(jobs["overview"].run, scheduler.PublishOverview)
    assert jobs["overview"].every == OVERVIEW_CACHE_SECONDS


def test_the_default_jobs_tick_with_nothing_to_do(fake_redis: fakeredis.FakeRedis,
                                                  clock: FakeClock, history_db: Engine) -> None:
    rt = make_runtime(fake_redis, clock, database_url=str(history_db.url))
    scheduler.tick(rt, scheduler.default_jobs(), "node")
    assert rt.redis.llen(QUEUE_EVENTS) == 0
    leases: Any = rt.redis.keys("rb:sched:*")
    assert {k.decode() for k in leases} == {
        keys.scheduler_job(n) for n in ("lanes", "callrail_dispatch", "reconcile", "overview")}
    assert rt.redis.exists(keys.OVERVIEW)


def test_the_published_overview_spares_the_web_processes_its_queries(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, history_db: Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(fake_redis, clock, database_url=str(history_db.url))
    assert scheduler.PublishOverview()(rt) == 1
    web = Operations(rt.settings, fake_redis, history_db, clock, rt.tenants)

    def no_sql(*_: Any, **__: Any) -> Any:
        raise AssertionError("a web process ran the overview's queries")

    monkeypatch.setattr(overview, "per_minute", no_sql)
    clock.advance(OVERVIEW_FRESH_SECONDS - 1)
    seen = web.overview()
    assert {t["tenant"] for t in seen["tenants"]} == set(rt.tenants)
    assert seen["now"] == clock.now() - (OVERVIEW_FRESH_SECONDS - 1)
    # Published too long ago (the scheduler stopped): the web process computes its own.
    clock.advance(2 * OVERVIEW_FRESH_SECONDS)
    with pytest.raises(AssertionError, match="overview's queries"):
        web.overview()


def test_an_unreachable_database_is_said_once_and_tried_again(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "rilla_bridge.scheduler")
    rt = make_runtime(fake_redis, clock,
                      database_url=f"sqlite:///{tmp_path / 'missing' / 'h.db'}")
    job = scheduler.PublishOverview()
    assert [job(rt), job(rt)] == [0, 0]
    assert [r.getMessage() for r in caplog.records] == ["overview not published"]
    assert not fake_redis.exists(keys.OVERVIEW)


# -- a restart: a stopping copy gives its job leases up ----------------------------------------

def _counting(runs: list[str], name: str) -> Callable[[Runtime], int]:
    def run(r: Runtime) -> int:
        runs.append(name)
        return 1
    return run


def test_a_stopping_copy_releases_its_leases_and_another_takes_every_job_at_once(
        rt: Runtime, clock: FakeClock) -> None:
    runs: list[str] = []
    jobs_a = [Job("lanes", 0.25, _counting(runs, "a")), Job("reconcile", 5.0,
                                                             _counting(runs, "a"))]
    jobs_b = [Job("lanes", 0.25, _counting(runs, "b")), Job("reconcile", 5.0,
                                                             _counting(runs, "b"))]
    scheduler.tick(rt, jobs_a, "node-a")
    scheduler.tick(rt, jobs_b, "node-b")       # the same instant: a holds both jobs
    assert runs == ["a", "a"]
    assert scheduler.release(rt, jobs_b, "node-b") == 0   # b holds nothing: nothing goes
    assert scheduler.release(rt, jobs_a, "node-a") == 2
    for job in jobs_b:
        job.next_at = 0.0                      # b's next tick (its own pace), no time passed
    scheduler.tick(rt, jobs_b, "node-b")
    assert runs == ["a", "a", "b", "b"]        # without the release: reconcile 4.5 s later
    owners: Any = [rt.redis.hget(keys.scheduler_job(n), "owner") for n in ("lanes",
                                                                           "reconcile")]
    assert owners == [b"node-b", b"node-b"]


def test_run_forever_releases_its_leases_when_it_stops(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, Callable[..., None]] = {}
    monkeypatch.setattr(signal, "signal",
                        lambda signum, handler: handlers.__setitem__(signum, handler))

    def stop_now(r: Runtime) -> int:
        handlers[signal.SIGTERM](signal.SIGTERM, None)
        return 1

    scheduler.run_forever(rt, [Job("job", 10.0, stop_now)], interval=0.25)
    assert rt.redis.exists(keys.scheduler_job("job")) == 0


@pytest.mark.parametrize("blob", [b"not zlib", zlib.compress(b"[1, 2]"),
                                  zlib.compress(b'{"now": "soon"}')])
def test_a_published_overview_that_cannot_be_read_is_computed_instead(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, history_db: Engine,
        blob: bytes) -> None:
    rt = make_runtime(fake_redis, clock, database_url=str(history_db.url))
    fake_redis.set(keys.OVERVIEW, blob)
    seen = Operations(rt.settings, fake_redis, history_db, clock, rt.tenants).overview()
    assert seen["now"] == clock.now() and {t["tenant"] for t in seen["tenants"]} == set(
        rt.tenants)
    stored = json.loads(zlib.decompress(fake_redis.get(keys.OVERVIEW)))  # type: ignore[arg-type]
    assert stored["now"] == clock.now()   # and published for the other web processes
