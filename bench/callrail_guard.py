"""Benchmark the CallRail quota guard with real processes (issue 4).

Starts the CallRail sandbox (scaled-down quota, rolling windows, 429 when exceeded), the Rilla
sandbox, the web app, an ``events`` worker, several ``callrail`` workers and two schedulers, and
queues a CallRail backlog (``count`` jobs in the live lane). Then:

1. budget: while the backlog is dispatched for ``--cycles`` windows, the CallRail requests made
   against what CallRail's rolling window allows (budget use), and the 429s served;
2. latency of ordinary deliveries (webhook POST -> appointment stored in the Rilla sandbox; no
   CallRail call needed) in interleaved blocks, ``quiet`` and ``busy`` in the order
   Q B B Q Q B B Q ... so that drift of the machine over the run favours neither arm:

   * quiet: the callrail workers and both schedulers are stopped (SIGSTOP): no CallRail work
     and no guard activity at all;
   * busy: everything runs, the guard dispatching the backlog at the budget's pace.

   The extra latency is median(busy) - median(quiet) with a 95 % block-bootstrap interval
   (blocks resampled, then samples within them): when it holds 0, the guard's effect is not
   measurable with these samples. Pausing the schedulers
   too makes the comparison conservative: whatever they cost is counted against the guard.

Run: ``.venv/bin/python -m bench.callrail_guard [--redis-url URL] [--cycles 3] [--events 200]``
(a real Redis is needed; the database given is flushed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import redis
import requests

from rilla_bridge.clock import SystemClock
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.scripts import Scripts
from tests.system import System

ACCOUNT, API_KEY = "111111111", "acme-callrail-api-key-01"
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "callrail" / "post_call.json"


def quota_env(hourly: int, hour_s: int) -> dict[str, str]:
    return {"CALLRAIL_HOURLY_LIMIT": str(hourly), "CALLRAIL_DAILY_LIMIT": str(hourly * 10),
            "CALLRAIL_HOUR_SECONDS": str(hour_s), "CALLRAIL_DAY_SECONDS": str(hour_s * 10),
            "RECONCILE_INTERVAL_SECONDS": "3600"}


def deliveries(s: System, n: int, tag: str, spacing: float) -> list[float]:
    """POST ``n`` ordinary webhooks (app recording URLs: no CallRail call); latencies in ms."""
    base = json.loads(FIXTURE.read_text())
    sent: dict[str, float] = {}
    for i in range(n):
        cid = f"CAL{tag}{i:06d}"
        body = dict(base, resource_id=cid,
                    recording=f"https://app.callrail.com/calls/{cid}/recording/redirect?k=1")
        sent[f"callrail-{cid}"] = time.time()
        r = s.post_callrail("acme", body, event="post_call")
        r.raise_for_status()
        time.sleep(spacing)
    deadline = time.monotonic() + 30
    got: dict[str, float] = {}
    while time.monotonic() < deadline and len(got) < n:
        for a in s.sandbox("appointments"):
            if a["event_id"] in sent:
                got[a["event_id"]] = a["_sandbox"]["created_at"]
        time.sleep(0.2)
    if len(got) < n:
        raise SystemExit(f"only {len(got)} of {n} deliveries arrived")
    return [(got[k] - sent[k]) * 1000 for k in sent]


def summary(ms: list[float]) -> str:
    qs = statistics.quantiles(ms, n=20)
    return f"median {statistics.median(ms):.1f} ms, p95 {qs[18]:.1f} ms, max {max(ms):.1f} ms"


def median_diff_ci(a: list[list[float]], b: list[list[float]], rounds: int = 4000
                   ) -> tuple[float, float]:
    """95 % interval of median(b) - median(a) by a block bootstrap: whole blocks are drawn
    with replacement in each arm, then samples within them. Samples of one block share the
    machine's state of those seconds, so drawing single samples as if independent gives an
    interval too narrow (a first version did, and excluded 0 on both sides across runs).
    When the interval holds 0 the difference is not measurable with these samples."""
    rng = random.Random(7)

    def draw(blocks: list[list[float]]) -> float:
        picked = [x for blk in rng.choices(blocks, k=len(blocks))
                  for x in rng.choices(blk, k=len(blk))]
        return statistics.median(picked)

    diffs = sorted(draw(b) - draw(a) for _ in range(rounds))
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds)]


def pause(procs: list[Any], stopped: bool) -> None:
    """SIGSTOP (or SIGCONT) each process group: a stopped process uses no CPU and no Redis."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP if stopped else signal.SIGCONT)


def budget(s: System, a: argparse.Namespace, since: float) -> dict[str, Any]:
    """CallRail requests over whole windows of the backlog, against what the window allows."""
    acct = requests.get(f"{s.callrail}/_sandbox/stats?times=1",
                        timeout=5).json()["by_account"][ACCOUNT]
    times = sorted(t for t, _ in acct["times"] if t >= since)
    starts = [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 0.5]
    out: dict[str, Any] = {"requests": len(times), "served_429": acct["served_429"]}
    if len(starts) >= a.cycles + 2:
        t0, t1 = starts[1], starts[1 + a.cycles]  # the first burst warms the workers up
        used = sum(1 for t in times if t0 <= t < t1)
        allowed = a.hourly * (t1 - t0) / a.hour_seconds
        out.update(budget_use=round(used / allowed, 4), measured_requests=used,
                   measured_seconds=round(t1 - t0, 2), budget=round(allowed, 1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--hourly", type=int, default=30, help="scaled hourly limit")
    p.add_argument("--hour-seconds", type=int, default=10, help="scaled hour")
    p.add_argument("--cycles", type=int, default=3, help="measured windows of backlog")
    p.add_argument("--events", type=int, default=200, help="deliveries per arm (quiet, busy)")
    p.add_argument("--blocks", type=int, default=16,
                   help="interleaved latency blocks, Q B B Q ... (a multiple of 4)")
    p.add_argument("--workers", type=int, default=3, help="callrail worker processes")
    a = p.parse_args(argv)
    client = redis.Redis.from_url(a.redis_url)
    client.flushdb()
    s = System(a.redis_url, env_extra=quota_env(a.hourly, a.hour_seconds))
    try:
        s.start_callrail_sandbox("--hourly-limit", str(a.hourly), "--daily-limit",
                                 str(a.hourly * 10), "--hour-seconds", str(a.hour_seconds),
                                 "--day-seconds", str(a.hour_seconds * 10))
        requests.post(f"{s.callrail}/_sandbox/accounts/{ACCOUNT}",
                      json={"api_key": API_KEY, "calls": []}, timeout=5).raise_for_status()
        client.set("rb:recon:acme", 1, ex=3600)  # no reconciliation traffic in the bench
        s.start_rilla_sandbox()
        s.start_web()
        s.start_worker("worker", "events", 20)
        for i in range(a.workers):
            s.start_worker(f"crworker{i}", "callrail", 10)
        s.start_scheduler("scheduler1")
        s.start_scheduler("scheduler2")
        deliveries(s, 10, "warm", 0.02)  # warm up web and worker processes

        guard = QuotaGuard(client, Scripts(client), SystemClock(), hourly_limit=a.hourly,
                           daily_limit=a.hourly * 10, hour_seconds=a.hour_seconds,
                           day_seconds=a.hour_seconds * 10)
        cycle = a.hour_seconds + guard.margin_seconds + 0.1
        per_block = max(10, 2 * a.events // a.blocks)   # an arm's events over its blocks
        spacing = 0.05
        block_s = per_block * (spacing + 0.01) + 1.5
        # enough backlog for the budget windows and every busy block, with room to spare
        jobs = a.hourly * (a.cycles + 4) + int(a.hourly * (a.blocks / 2 * block_s)
                                              / a.hour_seconds) + a.hourly
        for _ in range(jobs):
            guard.submit(ACCOUNT, "live", {"type": "count", "tenant": "acme", "run": "bench",
                                           "start_date": "2025-01-01", "end_date": "2025-01-02",
                                           "tries": 0})
        started = time.time()
        time.sleep((a.cycles + 1) * cycle + 0.6)
        out = budget(s, a, started)
        print(f"CallRail backlog: {out}", flush=True)

        paused = [s.procs[n] for n in s.procs if n.startswith(("crworker", "scheduler"))]
        arms: dict[str, list[list[float]]] = {"quiet": [], "busy": []}
        order = ["quiet", "busy", "busy", "quiet"] * (a.blocks // 4 + 1)
        try:
            for i, arm in enumerate(order[:a.blocks]):
                pause(paused, arm == "quiet")
                time.sleep(0.5)   # let a stopped or resumed process settle
                arms[arm].append(deliveries(s, per_block, f"{arm}{i}", spacing))
                print(f"block {i + 1}/{a.blocks} {arm}: {summary(arms[arm][-1])}", flush=True)
        finally:
            pause(paused, False)
        acct = requests.get(f"{s.callrail}/_sandbox/stats", timeout=5).json()
        served_429 = acct["by_account"][ACCOUNT]["served_429"]
        quiet = [x for blk in arms["quiet"] for x in blk]
        busy = [x for blk in arms["busy"] for x in blk]
        print(f"CallRail 429s served over the whole run: {served_429}")
        print(f"deliveries, quiet blocks ({len(quiet)}): {summary(quiet)}")
        print(f"deliveries, busy blocks ({len(busy)}):  {summary(busy)}")
        lo, hi = median_diff_ci(arms["quiet"], arms["busy"])
        print(f"extra latency (median): {statistics.median(busy) - statistics.median(quiet):+.2f}"
              f" ms, 95 % block-bootstrap interval [{lo:+.2f}, {hi:+.2f}] ms"
              f" ({'holds 0: not measurable' if lo <= 0 <= hi else 'excludes 0: measurable'})")
    finally:
        s.stop()
        client.flushdb()


if __name__ == "__main__":
    main()
