"""Issue 12: one client's backlog never slows another's calls.

Two tenants share the workers. Tenant A (``acme``) has a backlog and a Rilla that answers in
3 s; tenant B (``beta``) posts live calls at 10/s to a Rilla that answers in 100 ms. Reported
per A backlog size: B's latency from the 202 to Rilla's 200 (created_at in the sandbox minus
the moment the POST was sent), and A's delivery rate against its cap's ceiling
(cap / A's latency). A replay run puts A's dead letters back instead (bulk lane, paced).

A's backlog is loaded straight through ``Lifecycle.receive`` (the same script the web runs),
which is much faster than posting 50,000 webhooks; B posts real signed webhooks to the web.
Loopback only; Redis db 14 is flushed by every run.

    .venv/bin/python -m bench.fairness --sizes 1000 10000 50000 --replay 20000
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import requests

from bench.common import (
    DEFAULT_REDIS,
    FIXTURE,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    write_results,
)
from rilla_bridge.clock import SystemClock
from rilla_bridge.lifecycle import make_lifecycle, new_event_id
from rilla_bridge.providers.callrail import signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.system import TENANTS, System

A, B = "acme", "beta"
A_KEY, B_KEY = "acme-rilla-key-000001", "beta-rilla-key-000002"
B_SIGNING = "beta-signing-key-0002"


def _bodies(run: str) -> tuple[str, str]:
    body = json.loads(FIXTURE.read_text())
    body["resource_id"] = "CALMARKER"
    body.pop("id", None)
    return json.dumps(body, separators=(",", ":")), "CALMARKER"


class BPoster:
    """B's live calls: signed post-calls at a steady rate, each POST's send time kept."""

    def __init__(self, web: str) -> None:
        self.url = f"{web}/webhooks/callrail/{B}?event=post_call"
        self.template, self.marker = _bodies(uuid.uuid4().hex[:8])
        self.run = uuid.uuid4().hex[:8]
        self.pool = ThreadPoolExecutor(8)
        self.sent: dict[str, float] = {}
        self.codes: dict[int, int] = {}
        self.lock = threading.Lock()

    def _post(self, i: int) -> None:
        rid = f"CALB{self.run}{i:08d}"
        raw = self.template.replace(self.marker, rid).encode()
        t0 = time.time()
        try:
            code = requests.post(self.url, data=raw, timeout=10,
                                 headers={"Signature": signature(B_SIGNING, raw)}).status_code
        except requests.RequestException:
            code = -1
        with self.lock:
            self.sent[f"callrail-{rid}"] = t0
            self.codes[code] = self.codes.get(code, 0) + 1

    def steady(self, n: int, rate: float) -> None:
        t0 = time.monotonic()
        futures = []
        for k in range(n):
            slot = t0 + k / rate
            if slot > time.monotonic():
                time.sleep(slot - time.monotonic())
            futures.append(self.pool.submit(self._post, k))
        for f in futures:
            f.result()


def load_backlog(redis_url: str, n: int, replay: bool) -> float:
    """A's backlog of ``n`` events: live webhooks, or dead letters replayed (bulk lane)."""
    settings = Settings(redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    tenants = parse_tenants(TENANTS, env={})
    lc = make_lifecycle(client, SystemClock(), settings, tenants)
    template, marker = _bodies("")
    run = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    for i in range(n):
        rid = f"CALA{run}{i:08d}"
        body = template.replace(marker, rid).encode()
        if replay:
            lc.replay({"id": new_event_id(time.time()), "tenant": A, "source": "callrail",
                       "kind": "post_call", "call_id": rid, "received_at": time.time(),
                       "body": body}, actor="bench")
        else:
            lc.receive(source="callrail", tenant=A, kind="post_call", body=body, call_id=rid)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def one_run(args: argparse.Namespace, size: int, replay: bool) -> dict[str, Any]:
    flush(args.redis)
    sysm = System(redis_url=args.redis, env_extra={"BULK_RATE_PER_SECOND": str(args.bulk_rate)})
    label = f"replay {size}" if replay else f"backlog {size}"
    try:
        sysm.start_rilla_sandbox(A_KEY, B_KEY)
        for key, ms in ((A_KEY, args.a_latency_ms), (B_KEY, args.b_latency_ms)):
            sysm.sandbox("latency", method="POST", json={"latency_ms": ms, "api_key": key})
        sysm.start_web(workers=2)
        for k in range(args.processes):
            sysm.start_worker(name=f"worker{k}", concurrency=args.concurrency)
        sysm.start_scheduler()
        load_s = load_backlog(args.redis, size, replay)
        time.sleep(args.a_latency_ms / 1000 + 2)   # A reaches its cap in flight
        poster = BPoster(sysm.web)
        n = int(args.b_rate * args.b_seconds)
        a_before = len(sysm.sandbox("appointments", params={"api_key": A_KEY}))
        t0 = time.time()
        poster.steady(n, args.b_rate)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = sysm.sandbox("appointments", params={"api_key": B_KEY})
            if len(got) >= poster.codes.get(202, 0):
                break
            time.sleep(0.2)
        t1 = time.time()
        a_after = len(sysm.sandbox("appointments", params={"api_key": A_KEY}))
        created = {a["event_id"]: a["_sandbox"]["created_at"]
                   for a in sysm.sandbox("appointments", params={"api_key": B_KEY})}
        lat = [1000 * (created[e] - s) for e, s in poster.sent.items() if e in created]
        cap = Settings().tenant_max_inflight
        ceiling = min(cap / (args.a_latency_ms / 1000),
                      args.bulk_rate if replay else float("inf"))
        a_rate = (a_after - a_before) / (t1 - t0)
        row = {"run": label, "A waiting": size, "load s": round(load_s, 1),
               "B sent": n, "B 202": poster.codes.get(202, 0), "B delivered": len(lat),
               "B p50 ms": round(pct(lat, 50), 1), "B p95 ms": round(pct(lat, 95), 1),
               "B max ms": round(max(lat), 1) if lat else None,
               "B mean ms": round(statistics.fmean(lat), 1) if lat else None,
               "A /s": round(a_rate, 1), "A ceiling /s": round(ceiling, 1)}
        print(table([row], list(row)), flush=True)
        return row
    finally:
        teardown(sysm, args.redis)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", default=DEFAULT_REDIS)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 50000])
    p.add_argument("--replay", type=int, default=20000, help="replay run size (0 = skip)")
    p.add_argument("--a-latency-ms", type=int, default=3000)
    p.add_argument("--b-latency-ms", type=int, default=100)
    p.add_argument("--b-rate", type=float, default=10.0)
    p.add_argument("--b-seconds", type=float, default=30.0)
    p.add_argument("--bulk-rate", type=float, default=50.0)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=200)
    args = p.parse_args()
    rows = [one_run(args, size, replay=False) for size in args.sizes]
    if args.replay:
        rows.append(one_run(args, args.replay, replay=True))
    print()
    print(f"B (10 calls/s, Rilla {args.b_latency_ms} ms) while A (Rilla {args.a_latency_ms} "
          f"ms) has a backlog; target: B p95 < 300 ms and flat; A at its cap's ceiling")
    print(table(rows, list(rows[0])))
    path = write_results("fairness", {"args": vars(args), "machine": machine(), "rows": rows})
    print(f"\nresults: {path}\nrerun:   {rerun_command()}")


if __name__ == "__main__":
    main()
