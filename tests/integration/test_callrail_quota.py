"""Quota guard with a real Redis, several OS processes and the sandbox enforcing CallRail's quota.

Windows are scaled down (hour = 4 s, day = 40 s); the guard's logic is the same as in production.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from rilla_bridge.clients.callrail import CallRailClient
from rilla_bridge.clock import SystemClock
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.scripts import Scripts
from sandbox.callrail import make_call
from tests.callrail_sandbox import control, sandbox_process

pytestmark = pytest.mark.integration

KEY = "sandbox-key"
HOURLY, DAILY, HOUR_S, DAY_S = 40, 400, 4.0, 40.0
WORKERS = 4


def guard_for(redis_url: str, **kw: Any) -> QuotaGuard:
    opts: dict[str, Any] = {"hourly_limit": HOURLY, "daily_limit": DAILY,
                            "hour_seconds": HOUR_S, "day_seconds": DAY_S}
    opts.update(kw)
    client = redis.Redis.from_url(redis_url)
    return QuotaGuard(client, Scripts(client), SystemClock(), **opts)


def worker(redis_url: str, base: str, account: str, guard_kw: dict[str, Any],
           ready: Any, go: Any, window: Any, out: Any) -> None:
    """One worker process: take a job, make its one request, report what happened."""
    g = guard_for(redis_url, **guard_kw)
    client = CallRailClient(base, read_timeout=5)
    ready.put(os.getpid())
    go.wait(30)
    start, stop = window[0], window[1]
    while time.time() < start:
        time.sleep(0.001)
    log: list[tuple[str, float, float, str, str]] = []  # kind, granted_at, t, lane, call
    while time.time() < stop:
        jobs = g.take(account, 1)
        if not jobs:
            wait = g.next_grant_in(account)
            if wait is None:
                break
            # A real scheduler re-enqueues with this delay; here the loop just sleeps.
            time.sleep(max(0.002, min(wait, stop - time.time(), 0.25)))
            continue
        job = jobs[0]
        res = client.get_recording(KEY, account, job["call_id"])
        log.append((res.kind, job["granted_at"], time.time(), job["lane"], job["call_id"]))
        if res.kind == "ok":
            g.record_success(account)
        else:
            if res.kind == "rate_limited":
                secs = g.pause(account)
                log.append(("pause", time.time(), secs, "", ""))
            g.submit(account, job["lane"], {"call_id": job["call_id"]}, front=True)
    out.put((os.getpid(), log))


def run_workers(redis_url: str, base: str, account: str, seconds: float,
                guard_kw: dict[str, Any]) -> tuple[float, float, dict[int, list[Any]]]:
    """Start WORKERS spawned processes together; returns (start, stop, log per pid)."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    window = ctx.Array("d", [0.0, 0.0])
    procs = [ctx.Process(target=worker, args=(redis_url, base, account, guard_kw, ready, go,
                                                 window, out)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=30)
        start = time.time() + 0.2
        window[0], window[1] = start, start + seconds
        go.set()
        logs = dict(out.get(timeout=seconds + 30) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return start, start + seconds, logs


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    with sandbox_process(hourly_limit=HOURLY, daily_limit=DAILY, hour_seconds=HOUR_S,
                         day_seconds=DAY_S) as base:
        yield base


def add_account(base: str, account: str, n: int) -> list[str]:
    ids = [f"CAL{account}{i:06d}" for i in range(n)]
    control(base, f"accounts/{account}", {"api_key": KEY, "calls": [make_call(c) for c in ids]})
    return ids


def timeline(start: float, logs: dict[int, list[Any]]) -> str:
    """Grants per window with the first and last grant's time (s after the run's start)."""
    grants = sorted(e[1] - start for log in logs.values() for e in log if e[0] != "pause")
    lines = []
    for w in range(math.ceil((grants[-1] if grants else 0) / HOUR_S) + 1):
        ws = [g for g in grants if w * HOUR_S <= g < (w + 1) * HOUR_S]
        if ws:
            lines.append(f"window {w}: {len(ws)} grants, {ws[0]:.3f}-{ws[-1]:.3f} s")
    return "\n".join(lines)


def test_backlog_uses_at_least_95_percent_of_budget_without_a_429(
        sandbox: str, real_redis: redis.Redis, redis_url: str) -> None:
    account = "1001"
    ids = add_account(sandbox, account, 400)
    g = guard_for(redis_url)
    for cid in ids:
        g.submit(account, "live", {"call_id": cid})
    for cid in ids[:50]:
        g.submit(account, "reconcile", {"call_id": cid})
    # The run ends half a window into the fourth, so that window's burst of 40 requests has
    # time to finish on a slow machine. (151/160 in two CI runs was not the machine: a grant
    # from a process whose clock read one bucket behind was never freed; see quota.lua's add.)
    seconds = 3 * HOUR_S + HOUR_S / 2
    start, _, logs = run_workers(redis_url, sandbox, account, seconds, {})

    stats = control(sandbox, "stats")["by_account"][account]
    # The most any client can get in `seconds` under a rolling window: one full budget for
    # every window that starts inside the run.
    budget = HOURLY * math.ceil(seconds / HOUR_S)
    entries = [e for log in logs.values() for e in log]
    use = stats["requests"] / budget
    print(f"\nbudget use {use:.1%} ({stats['requests']}/{budget}), "
          f"429s {stats['served_429']}, per worker {[len(v) for v in logs.values()]}")
    print(timeline(start, logs))
    assert stats["served_429"] == 0
    assert all(kind == "ok" for kind, *_ in entries)
    assert stats["requests"] == len(entries)
    assert use >= 0.95
    assert sum(1 for v in logs.values() if v) >= 3  # the work really was spread over processes
    # live work was waiting the whole time, so reconciliation never got a turn
    assert {lane for *_, lane, _ in entries} == {"live"}
    # no rolling window of HOUR_S ever held more than HOURLY grants
    grants = sorted(granted for _, granted, *_ in entries)
    assert max(sum(1 for t in grants if s <= t < s + HOUR_S) for s in grants) <= HOURLY


def test_a_429_pauses_the_account_in_every_process_and_work_resumes(
        sandbox: str, real_redis: redis.Redis, redis_url: str) -> None:
    account = "1002"
    ids = add_account(sandbox, account, 30)
    kw = {"pause_base_seconds": 1.0}
    g = guard_for(redis_url, **kw)
    for cid in ids:
        g.submit(account, "live", {"call_id": cid})
    control(sandbox, "force_429", {"account_id": account, "count": 1})
    _, _, logs = run_workers(redis_url, sandbox, account, 8.0, kw)

    stats = control(sandbox, "stats")["by_account"][account]
    assert stats["served_429"] == 1
    pauses = [(t, secs) for log in logs.values() for kind, t, secs, *_ in log if kind == "pause"]
    assert len(pauses) == 1
    paused_at, secs = pauses[0]
    assert 0.85 <= secs <= 1.15
    grants = [(granted, pid) for pid, log in logs.items()
              for kind, granted, *_ in log if kind != "pause"]
    # nobody, in any process, was granted a request while the pause was on
    assert not [t for t, _ in grants if paused_at <= t < paused_at + secs - 0.02]
    after = {pid for t, pid in grants if t >= paused_at + secs - 0.02}
    assert len(after) >= 2  # other processes, not just the one that saw the 429, resumed
    ok = [call for log in logs.values() for kind, *_, call in log if kind == "ok"]
    assert sorted(ok) == sorted(ids)  # every job done exactly once, the 429'd one included
    assert g.status(account)["pause_level"] == 0  # success after the pause reset the level
    assert g.accounts_waiting() == []
