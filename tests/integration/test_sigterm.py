"""A restart as Heroku does it (SIGTERM, SIGKILL 30 s later), under load, for every process
type: web, workers, scheduler, history. Each exits within 25 s with a clean code, and once it
is back every accepted (202) webhook reaches the Rilla sandbox. Work a SIGTERMed worker could
not finish goes back to its tenant's lane at once: another worker takes it well within the
8 s delivery lease, and nothing waits for the lease to lapse.

Real processes (tests/system.py), a Redis server of the test's own, the Rilla sandbox with
latency. Helpers are copied small from test_delivery.py (test modules do not import each
other)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from rilla_bridge import keys
from tests.support import RedisServer, until
from tests.system import System

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXIT_WITHIN = 25.0          # Heroku's SIGKILL comes at 30 s
LEASE = 8.0                 # DELIVERY_LEASE_SECONDS (the default)
GRACE = 4.0                 # WORKER_SHUTDOWN_GRACE_SECONDS in this test (production: 20)


def call_body(n: int, tenant: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / "callrail" / "post_call.json").read_bytes())
    body.update({"resource_id": f"CAL{tenant[:2]}{n:030x}",
                 "agent_email": "mike@acme.example" if tenant == "acme" else ""})
    return body


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Poster:
    """Posts distinct signed CallRail calls (both tenants) in the background and keeps what
    was accepted (202); a refused connection (the web restarting) is not accepted."""

    def __init__(self, s: System, per_second: float = 25.0) -> None:
        self.s = s
        self.pause = 1 / per_second
        self.accepted: dict[str, str] = {}     # Rilla event id -> our event id
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Poster:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            tenant = "acme" if n % 3 else "beta"
            body = call_body(n, tenant)
            n += 1
            try:
                r = self.s.post_callrail(tenant, body)
            except requests.RequestException:
                self.refused += 1
            else:
                if r.status_code == 202:
                    self.accepted[f"callrail-{body['resource_id']}"] = r.json()["id"]
                else:
                    self.refused += 1
            time.sleep(self.pause)


def sigterm(s: System, name: str) -> tuple[float, int]:
    """SIGTERM to the process group of ``name`` (as the platform signals every process of a
    dyno); returns how long it took to exit and its exit code. Fails after EXIT_WITHIN."""
    proc = s.procs.pop(name)
    s.workers.discard(name)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(f"{name} still running {EXIT_WITHIN}s after SIGTERM; log tail:\n"
                             f"{s.log(name)[-3000:]}") from None
    return time.monotonic() - sent, code


class Watch:
    """Polls the events in flight every 20 ms and notes, for each event one worker process
    holds, when another process claimed it or when it was finished (its record gone)."""

    def __init__(self, client: redis.Redis, pid: int) -> None:
        self.client = client
        self.mine = f":{pid}:"                  # claim tokens are host:pid:nonce/run
        self.held: set[str] = set()
        self.taken: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for eid, run in in_flight(self.client).items():
                if self.mine in run:
                    self.held.add(eid)
                elif (eid in self.held and run not in ("", "handed-back")
                      and eid not in self.taken):
                    self.taken[eid] = now
            for eid in self.held - set(self.finished) - set(self.taken):
                if not self.client.exists(keys.event(eid)):
                    self.finished[eid] = now
            time.sleep(0.02)


def in_flight(client: redis.Redis) -> dict[str, str]:
    """Events in flight now (both tenants): id -> the run holding it ('' none yet)."""
    ids = [_text(e) for t in ("acme", "beta") for e in client.zrange(keys.inflight(t), 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for eid in ids:
            pipe.hget(keys.event(eid), "claimed_by")
        runs = pipe.execute()
    return {eid: _text(r) if r else "" for eid, r in zip(ids, runs, strict=True)}


def lease_owners(client: redis.Redis) -> dict[str, str]:
    return {_text(k): _text(client.hget(k, "owner") or b"")
            for k in client.scan_iter("rb:sched:*")}


@pytest.fixture
def system(own_redis: RedisServer) -> Iterator[System]:
    s = System(own_redis.url, env_extra={"WORKER_SHUTDOWN_GRACE_SECONDS": str(GRACE)})
    yield s
    s.stop()


def test_sigterm_each_process_under_load_loses_nothing(system: System) -> None:
    s = system
    client = redis.Redis.from_url(s.redis_url)
    s.start_rilla_sandbox(latency_ms=1000, wait=False)
    s.start_web(wait=False)
    s.start_worker("worker-a", concurrency=30, wait=False)
    s.start_worker("worker-b", concurrency=30, wait=False)
    s.start_scheduler("scheduler-a", wait=False)
    s.start_scheduler("scheduler-b", wait=False)
    s.start_history(wait=False)
    s.ready()
    poster = Poster(s, per_second=15).start()
    report: dict[str, Any] = {}

    # -- workers: what runs either finishes or is handed back, and the other one takes it --
    until(lambda: sum(1 for r in in_flight(client).values() if r) >= 8, 20,
          "deliveries in flight")
    # The next 16 Rilla requests take 12 s, longer than the grace: some are worker-a's.
    s.sandbox("faults", "POST", json={"status": None, "latency_ms": 12000, "count": 16})
    time.sleep(1.5)
    watch = Watch(client, s.procs["worker-a"].pid)
    time.sleep(0.1)
    sent = time.monotonic()
    took, code = sigterm(s, "worker-a")
    # Until every delivery it held is finished or taken by worker-b (a busy machine makes
    # worker-b slow to reach a handed-back message; the lease would take 8 s and more).
    until(lambda: not watch.held - set(watch.finished) - set(watch.taken), 10,
          "every delivery of worker-a finished or taken")
    watch.stop()
    deadline = sent + GRACE                     # where it hands back what still runs
    finished = {e for e, t in watch.finished.items() if t <= deadline}
    late = watch.held - finished                # outlived the grace (as the test times it)
    # Each of those was taken by worker-b, or finished (by worker-a in the moment between
    # this test's deadline and its own, or by worker-b between two polls).
    waits = [min(watch.taken.get(e, 1e18), watch.finished.get(e, 1e18)) - deadline
             for e in late]
    handed = set(watch.taken)
    report["worker"] = {"exit_s": round(took, 2), "code": code, "held": len(watch.held),
                        "finished_in_grace": len(finished), "handed_back": len(handed),
                        "taken_after_grace_max_s": round(max(waits, default=-1), 3)}
    assert code == 0 and GRACE <= took < GRACE + 5, s.log("worker-a")[-3000:]
    assert handed, f"no delivery outlived the grace: nothing was handed back ({report})"
    # Nothing waited for the 8 s lease to lapse (and the sweep after it).
    assert max(waits) < LEASE / 2, report
    s.start_worker("worker-a2", concurrency=30)

    # -- web: finishes what it has, refuses new connections, exits ------------------------
    took, code = sigterm(s, "web")
    report["web"] = {"exit_s": round(took, 2), "code": code}
    assert took < EXIT_WITHIN and code == 0
    s.start_web()

    # -- scheduler: its job leases are released; the other copy carries on ----------------
    node_a = f"{socket.gethostname()}:{s.procs['scheduler-a'].pid}"
    node_b = f"{socket.gethostname()}:{s.procs['scheduler-b'].pid}"
    # Both copies race for each job's lease when it lapses: on a busy machine scheduler-b
    # may win every race for a while.
    until(lambda: node_a in lease_owners(client).values(), 30, "scheduler-a holding a job")
    took, code = sigterm(s, "scheduler-a")
    report["scheduler"] = {"exit_s": round(took, 2), "code": code}
    assert took < EXIT_WITHIN and code == 0
    assert node_a not in lease_owners(client).values()    # released, not left to lapse
    until(lambda: lease_owners(client).get(keys.scheduler_job("lanes")) == node_b, 1,
          "scheduler-b running the lanes job")
    assert "recovered events whose worker stopped" not in s.log("scheduler-a")

    # -- history: stops between batches; its pending entries are written once back --------
    took, code = sigterm(s, "history")
    report["history"] = {"exit_s": round(took, 2), "code": code}
    assert took < EXIT_WITHIN and code == 0
    s.start_history()

    time.sleep(1.0)
    poster.stop()
    accepted = dict(poster.accepted)
    report["accepted"], report["not accepted"] = len(accepted), poster.refused
    ended = time.monotonic()
    upserts = until(lambda: (u := s.sandbox("stats")["upserts_by_event"]) and
                    set(accepted) <= set(u) and u, 30, "every accepted event delivered")
    report["all delivered after posting stopped, s"] = round(time.monotonic() - ended, 2)
    report["duplicate upserts"] = sum(upserts.values()) - len(upserts)
    until(lambda: all(s.history.status(e) == "delivered" for e in accepted.values()), 30,
          "every accepted event delivered in history")
    # Nothing had to wait for a lease to lapse.
    assert "recovered events whose worker stopped" not in s.log("scheduler-b")
    print(f"\nSIGTERM under load: {report}")
