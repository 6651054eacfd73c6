"""Deliveries per second through the whole pipeline (issue 3), against a bare Celery baseline.

Modes (all on loopback, Redis db 14 flushed first, tenant ``acme`` from tests/system.py):

* throughput (default): for each sandbox latency (0 and 100 ms) post N signed CallRail
  post-call events to intake (``rilla-bridge web``) while no worker runs, then start the
  worker(s) and time until the Rilla sandbox's /_sandbox/stats shows N successful upserts.
  The same run starts ``bench/baseline_celery.py`` workers (same pool, concurrency, process
  count) on N queued tasks that only POST a fixed payload to the same sandbox.
* latency (part of the default run, at the highest latency): post at a steady ``--rate``
  events/s for ``--steady-seconds`` with the workers running; end-to-end latency is the
  sandbox appointment's ``_sandbox.created_at`` minus the moment the POST was sent.
* ``--memory``: post ``--memory-events`` (100,000) at a steady rate with the workers running
  and sample each worker's RSS (psutil) every few seconds; reports start/end/max RSS.

    .venv/bin/python -m bench.delivery
    .venv/bin/python -m bench.delivery --memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
from requests.adapters import HTTPAdapter

from bench import baseline_celery
from bench.common import (
    ACME_RILLA_KEY,
    DEFAULT_REDIS,
    NO_INTAKE_LIMIT,
    ROOT,
    BodyFactory,
    cpu_seconds,
    cpu_used,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    throwaway_postgres,
    write_results,
)
from rilla_bridge.celery_messages import task_message
from tests.support import wait_for
from tests.system import BIN, System


# -- traffic ---------------------------------------------------------------------------------
class Poster:
    """Posts signed bodies to intake from a thread pool; records when each POST was sent."""

    def __init__(self, web: str, threads: int = 12) -> None:
        self.url = f"{web}/webhooks/callrail/acme"
        self.factory = BodyFactory(uuid.uuid4().hex[:8])
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(threads)
        self.sent: dict[str, float] = {}
        self.codes: dict[int, int] = {}
        self.lock = threading.Lock()

    def _session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
            s.mount("http://", HTTPAdapter(pool_maxsize=2, max_retries=0))
        return s

    def _post(self, i: int) -> None:
        raw, sig = self.factory.signed(i)
        t0 = time.time()
        try:
            code = self._session().post(self.url, data=raw, timeout=30,
                                        headers={"Signature": sig}).status_code
        except requests.RequestException:
            code = -1
        with self.lock:
            self.sent[f"callrail-{self.factory.rid(i)}"] = t0
            self.codes[code] = self.codes.get(code, 0) + 1

    def burst(self, start: int, n: int) -> float:
        t = time.monotonic()
        list(self.pool.map(self._post, range(start, start + n)))
        return time.monotonic() - t

    def steady(self, start: int, n: int, rate: float, on_tick: Any = None) -> float:
        """Send n posts at ``rate``/s (each at its own slot); returns how late the last was."""
        t0 = time.monotonic()
        futures = []
        next_tick = t0
        for k in range(n):
            slot = t0 + k / rate
            now = time.monotonic()
            if slot > now:
                time.sleep(slot - now)
            futures.append(self.pool.submit(self._post, start + k))
            if on_tick and time.monotonic() >= next_tick:
                on_tick(k)
                next_tick = time.monotonic() + 5
        for f in futures:
            f.result()
        return time.monotonic() - t0 - n / rate


def sandbox_ok(sysm: System) -> int:
    return int(sysm.sandbox("stats")["by_status"].get("200", 0))


def wait_upserts(sysm: System, n: int, timeout: float, interval: float = 0.2) -> float | None:
    """Monotonic time at which the sandbox had counted n successful upserts (None: timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sandbox_ok(sysm) >= n:
            return time.monotonic()
        time.sleep(interval)
    return None


def created_span(sysm: System) -> tuple[float, float, dict[str, float]]:
    appts = sysm.sandbox("appointments", params={"api_key": ACME_RILLA_KEY})
    created = {a["event_id"]: a["_sandbox"]["created_at"] for a in appts}
    return min(created.values()), max(created.values()), created


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


# -- runs ------------------------------------------------------------------------------------
def make_system(args: argparse.Namespace, latency_ms: int, database_url: str = "") -> System:
    env = dict(NO_INTAKE_LIMIT)
    if args.tenant_max_inflight:
        env["TENANT_MAX_INFLIGHT"] = str(args.tenant_max_inflight)
    sysm = System(redis_url=args.redis, env_extra=env, database_url=database_url)
    sysm.start_rilla_sandbox(ACME_RILLA_KEY, latency_ms=latency_ms)
    return sysm


def start_workers(sysm: System, args: argparse.Namespace) -> tuple[float, list[int]]:
    t = time.monotonic()
    pids = [sysm.start_worker(name=f"worker{k}", concurrency=args.concurrency).pid
            for k in range(args.processes)]
    return t, pids


def run_ours(args: argparse.Namespace, latency_ms: int, steady: bool) -> dict[str, Any]:
    if args.database == "postgresql":
        with throwaway_postgres() as url:
            return _run_ours(args, latency_ms, steady, url)
    return _run_ours(args, latency_ms, steady, "")


def _run_ours(args: argparse.Namespace, latency_ms: int, steady: bool,
              database_url: str) -> dict[str, Any]:
    flush(args.redis)
    sysm = make_system(args, latency_ms, database_url)
    out: dict[str, Any] = {"pipeline": "rilla-bridge", "latency_ms": latency_ms, "n": args.events,
                           "database": args.database}
    try:
        sysm.start_web(workers=args.web_workers)
        sysm.start_scheduler()   # re-queues events that met a busy call or the tenant cap
        if args.database != "none":
            sysm.start_history()   # the history process writes every event to SQL meanwhile
        poster = Poster(sysm.web)
        out["post_seconds"] = round(poster.burst(0, args.events), 2)
        out["post_codes"] = dict(poster.codes)
        out["intake_rps"] = round(args.events / out["post_seconds"], 1)
        accepted = poster.codes.get(202, 0)   # a failed POST is the poster's, not a delivery
        out["n"] = accepted
        cpu0 = cpu_seconds(sysm.procs, args.redis)
        t_start, pids = start_workers(sysm, args)
        t_done = wait_upserts(sysm, accepted, args.timeout)
        out["cpu_s"] = cpu_used(cpu0, cpu_seconds(sysm.procs, args.redis))
        out.update(_rates(sysm, accepted, t_start, t_done))
        raw: dict[bytes, bytes] = redis.Redis.from_url(args.redis).hgetall(  # type: ignore[assignment]
            "rb:stats")
        out["rb_stats"] = {k.decode().split("|")[1]: int(float(v)) for k, v in raw.items()
                           if k.startswith(b"outcome|")}   # one tenant: outcome counts
        out["worker_rss_mb"] = [round(psutil.Process(p).memory_info().rss / 2**20, 1)
                                for p in pids]
        if steady:
            out["steady"] = steady_latency(sysm, poster, args)
    finally:
        teardown(sysm, args.redis)
    return out


def steady_latency(sysm: System, poster: Poster, args: argparse.Namespace) -> dict[str, Any]:
    n = int(args.rate * args.steady_seconds)
    before, accepted0 = sandbox_ok(sysm), poster.codes.get(202, 0)
    start = args.events
    lag = poster.steady(start, n, args.rate)
    wait_upserts(sysm, before + poster.codes.get(202, 0) - accepted0, args.timeout)
    _, _, created = created_span(sysm)
    ids = [f"callrail-{poster.factory.rid(i)}" for i in range(start, start + n)]
    lat = [1000 * (created[e] - poster.sent[e]) for e in ids if e in created]
    return {"rate": args.rate, "seconds": args.steady_seconds, "events": n,
            "delivered": len(lat), "poster_lag_s": round(lag, 2),
            "p50_ms": round(pct(lat, 50), 1), "p90_ms": round(pct(lat, 90), 1),
            "p99_ms": round(pct(lat, 99), 1), "max_ms": round(max(lat), 1),
            "mean_ms": round(statistics.fmean(lat), 1)}


def _cpu_ms(run: dict[str, Any] | None) -> str:
    """Machine CPU (all our processes and Redis) per delivery while the backlog drained."""
    if not run or not run.get("cpu_s") or not run.get("n"):
        return "-"
    return f"{1000 * sum(run['cpu_s'].values()) / run['n']:.2f}"


def _rates(sysm: System, n: int, t_start: float, t_done: float | None) -> dict[str, Any]:
    if t_done is None:
        return {"delivered": sandbox_ok(sysm), "timed_out": True}
    first, last, _ = created_span(sysm)
    wall = t_done - t_start
    return {"delivered": n, "wall_s": round(wall, 2), "per_s_wall": round(n / wall, 1),
            "first_to_last_s": round(last - first, 2),
            "per_s_steady": round(n / max(last - first, 1e-6), 1)}


def run_baseline(args: argparse.Namespace, latency_ms: int) -> dict[str, Any]:
    flush(args.redis)
    sysm = make_system(args, latency_ms)
    out: dict[str, Any] = {"pipeline": "baseline", "latency_ms": latency_ms, "n": args.events}
    try:
        client = redis.Redis.from_url(args.redis)
        with client.pipeline(transaction=False) as pipe:
            for i in range(args.events):
                pipe.lpush(baseline_celery.QUEUE,
                           task_message(baseline_celery.TASK, [i], baseline_celery.QUEUE))
            pipe.execute()
        cpu0 = cpu_seconds(sysm.procs, args.redis)
        t_start = time.monotonic()
        pids = []
        for k in range(args.processes):
            name = f"baseline{k}"
            pids.append(sysm._spawn(name, [
                str(BIN / "celery"), "-A", "bench.baseline_celery", "worker", "-Q",
                baseline_celery.QUEUE, "-P", "gevent", "-c", str(args.concurrency),
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
                "-n", f"{name}@%h"]).pid)
            log_file = sysm.logs[name]

            def ready(f: Path = log_file) -> bool:
                return b"ready" in f.read_bytes()

            wait_for(ready, timeout=30, what=f"{name} ready")
        t_done = wait_upserts(sysm, args.events, args.timeout)
        out["cpu_s"] = cpu_used(cpu0, cpu_seconds(sysm.procs, args.redis))
        out.update(_rates_baseline(sysm, args.events, t_start, t_done))
        out["worker_rss_mb"] = [round(psutil.Process(p).memory_info().rss / 2**20, 1)
                                for p in pids]
    finally:
        teardown(sysm, args.redis)
    return out


def _rates_baseline(sysm: System, n: int, t_start: float, t_done: float | None) -> dict[str, Any]:
    if t_done is None:
        return {"delivered": sandbox_ok(sysm), "timed_out": True}
    appts = sysm.sandbox("appointments", params={"api_key": ACME_RILLA_KEY})
    times = [a["_sandbox"]["created_at"] for a in appts]
    wall = t_done - t_start
    span = max(times) - min(times)
    return {"delivered": n, "wall_s": round(wall, 2), "per_s_wall": round(n / wall, 1),
            "first_to_last_s": round(span, 2), "per_s_steady": round(n / max(span, 1e-6), 1)}


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    flush(args.redis)
    sysm = make_system(args, args.memory_latency_ms)
    samples: list[dict[str, Any]] = []
    n = args.memory_events
    try:
        sysm.start_web(workers=args.web_workers)
        sysm.start_scheduler()
        _, pids = start_workers(sysm, args)
        procs = [psutil.Process(p) for p in pids]
        poster = Poster(sysm.web)
        t0 = time.monotonic()

        def sample(k: int) -> None:
            rss = [round(p.memory_info().rss / 2**20, 1) for p in procs]
            samples.append({"t": round(time.monotonic() - t0, 1), "posted": k, "rss_mb": rss})
            print(f"  t={samples[-1]['t']:7.1f}s posted={k:6d} worker RSS MB={rss}", flush=True)

        sample(0)
        lag = poster.steady(0, n, args.memory_rate, on_tick=sample)
        t_done = wait_upserts(sysm, poster.codes.get(202, 0), args.timeout, interval=2)
        sample(n)
        out = {"events": n, "rate": args.memory_rate, "latency_ms": args.memory_latency_ms,
               "poster_lag_s": round(lag, 1), "post_codes": dict(poster.codes),
               "delivered": sandbox_ok(sysm), "complete": t_done is not None,
               "samples": samples}
        first_after_warm = next((s for s in samples if s["posted"] >= min(5000, n)), samples[0])
        out["rss_start_mb"] = samples[0]["rss_mb"]
        out["rss_after_5k_mb"] = first_after_warm["rss_mb"]
        out["rss_end_mb"] = samples[-1]["rss_mb"]
        out["rss_max_mb"] = [max(s["rss_mb"][i] for s in samples) for i in range(len(pids))]
        return out
    finally:
        teardown(sysm, args.redis)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="Redis URL of a db this benchmark may FLUSH (default db 14)")
    p.add_argument("--events", type=int, default=10000)
    p.add_argument("--latencies", type=int, nargs="+", default=[0, 100])
    p.add_argument("--concurrency", type=int, default=200, help="gevent greenlets per worker")
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--tenant-max-inflight", type=int, default=0,
                   help="TENANT_MAX_INFLIGHT for the run (0: the production default, 128)")
    p.add_argument("--rate", type=float, default=200, help="steady rate for the latency run")
    p.add_argument("--steady-seconds", type=float, default=30)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--database", choices=["postgresql", "sqlite", "none"], default="postgresql",
                   help="where the history process writes (none: no history process; the "
                        "records wait in Redis)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--memory", action="store_true", help="the long RSS run instead")
    p.add_argument("--memory-events", type=int, default=100000)
    p.add_argument("--memory-rate", type=float, default=400)
    p.add_argument("--memory-latency-ms", type=int, default=100)
    args = p.parse_args(argv)
    config = (f"{args.processes} worker process(es) x gevent -c {args.concurrency}, "
              f"web: granian x{args.web_workers}, TENANT_MAX_INFLIGHT="
              f"{args.tenant_max_inflight or 'default (128)'}")
    if args.memory:
        print(f"memory run: {args.memory_events} events at {args.memory_rate}/s; {config}")
        res = run_memory(args)
        print(f"\nworker RSS MB start={res['rss_start_mb']} after 5k={res['rss_after_5k_mb']} "
              f"end={res['rss_end_mb']} max={res['rss_max_mb']}; delivered {res['delivered']}"
              f"/{res['events']}")
        path = write_results("delivery-memory", {"machine": machine(), "command": rerun_command(),
                                                 "config": config, "result": res})
        print(f"results: {path.relative_to(ROOT)}\nrerun:   {rerun_command()}")
        return 0
    rows, runs = [], []
    for i, lat in enumerate(args.latencies):
        steady = i == len(args.latencies) - 1 and args.steady_seconds > 0
        ours = run_ours(args, lat, steady)
        base = None if args.no_baseline else run_baseline(args, lat)
        runs += [ours] + ([base] if base else [])
        row = {"sandbox latency ms": lat, "N": args.events,
               "ours /s (wall)": ours.get("per_s_wall"),
               "ours /s (first-last)": ours.get("per_s_steady"),
               "baseline /s (wall)": base.get("per_s_wall") if base else "",
               "baseline /s (first-last)": base.get("per_s_steady") if base else "",
               "ratio (wall)": round(ours["per_s_wall"] / base["per_s_wall"], 3)
               if base and ours.get("per_s_wall") and base.get("per_s_wall") else "",
               "CPU ms/delivery ours / base": f"{_cpu_ms(ours)} / {_cpu_ms(base)}",
               "busy requeues": ours.get("rb_stats", {}).get("requeued_busy", 0),
               "post codes": ours.get("post_codes"),
               "intake req/s": ours.get("intake_rps")}
        rows.append(row)
        print(table([row], list(row)), flush=True)
        for run in (ours, base):
            if run and run.get("cpu_s"):
                print(f"  CPU seconds while draining, {run['pipeline']}: {run['cpu_s']}")
    print(f"\ndeliveries/s, {config}; {os.cpu_count()} CPUs; target >= 500/s at 100 ms")
    print(table(rows, list(rows[0])))
    st = runs[-2 if not args.no_baseline else -1].get("steady")
    if st:
        print(f"\nend-to-end latency at a steady {st['rate']:g} events/s for {st['seconds']:g}s "
              f"(sandbox latency {args.latencies[-1]} ms): p50 {st['p50_ms']} ms, p90 "
              f"{st['p90_ms']} ms, p99 {st['p99_ms']} ms, max {st['max_ms']} ms "
              f"({st['delivered']}/{st['events']} delivered)")
    path = write_results("delivery", {"machine": machine(), "command": rerun_command(),
                                      "config": config, "rows": rows, "runs": runs})
    print(f"\nresults: {path.relative_to(ROOT)}\nrerun:   {rerun_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
