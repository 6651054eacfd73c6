"""Intake throughput and latency (issue 2): rilla-bridge's web process against a bare baseline.

For each configuration ``OURS[/BASE]`` the run starts

* the bare baseline, ``bench/baseline_app.py`` (Flask handler that only LPUSHes the body),
  always under gunicorn (sync, or gthread): the naive stack we measure ourselves against, and
* rilla-bridge via tests/system.py: ``rilla-bridge web`` (granian, as in the Procfile) for
  ``granian:W``, or the same WSGI app under gunicorn for ``sync:W`` / ``gthread:W:T``,

and drives each with wrk (``--connections`` connections, default 32) for ``--duration``
seconds after a short warm-up, with pre-generated, signed, unique CallRail post-call bodies
(tenant ``acme``; each body has its own resource_id so dedup never short-circuits). Redis db
14 is flushed before every measurement. Prints a table and writes bench/results/intake-*.json.

    .venv/bin/python -m bench.intake --configs granian:2 --repeat 4   # vs gunicorn sync -w 2
    .venv/bin/python -m bench.intake --configs granian:2/sync:4 sync:4 --repeat 4
    .venv/bin/python -m bench.intake --configs gthread:2:4 --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from bench.common import (
    DEFAULT_REDIS,
    NO_INTAKE_LIMIT,
    ROOT,
    BodyFactory,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    write_results,
)
from tests.support import free_port, wait_for
from tests.system import BIN, System

LUA = ROOT / "bench" / "intake.lua"


def _server(text: str) -> dict[str, Any]:
    """``sync:W``, ``gthread:W:T`` (gunicorn) or ``granian:W``."""
    parts = text.split(":")
    kind, workers = parts[0], int(parts[1])
    if kind not in ("sync", "gthread", "granian"):
        raise argparse.ArgumentTypeError("server must be sync:W, gthread:W:T or granian:W")
    threads = int(parts[2]) if len(parts) > 2 else (4 if kind == "gthread" else 1)
    return {"worker_class": kind, "workers": workers, "threads": threads,
            "name": f"{kind} w={workers}" + (f" t={threads}" if kind == "gthread" else "")}


def parse_config(text: str) -> dict[str, Any]:
    """``OURS[/BASE]``: rilla-bridge's server, and the baseline's (always gunicorn: the bare
    Flask app's naive stack). Without ``/BASE`` the baseline runs gunicorn with the same
    setting, or ``sync:W`` when ours runs granian with W workers."""
    ours_text, _, base_text = text.partition("/")
    ours = _server(ours_text)
    if base_text:
        base = _server(base_text)
    elif ours["worker_class"] == "granian":
        base = _server(f"sync:{ours['workers']}")
    else:
        base = ours
    if base["worker_class"] == "granian":
        raise argparse.ArgumentTypeError("the baseline runs gunicorn (sync or gthread)")
    name = ours["name"] if base is ours else f"{ours['name']} vs base {base['name']}"
    return {"ours": ours, "base": base, "name": name}


def gunicorn_args(cfg: dict[str, Any]) -> list[str]:
    args = ["--workers", str(cfg["workers"]), "--worker-class", cfg["worker_class"],
            "--no-control-socket"]
    if cfg["worker_class"] == "gthread":
        args += ["--threads", str(cfg["threads"])]
    return args


def make_bodies(n: int, path: Path) -> None:
    factory = BodyFactory(uuid.uuid4().hex[:8])
    with path.open("wb") as out:
        for i in range(n):
            raw, sig = factory.signed(i)
            out.write(sig.encode() + b"\t" + raw + b"\n")


def wrk(url: str, bodies: Path, seconds: float, connections: int, threads: int) -> dict[str, Any]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(seconds)}s",
           "--timeout", "5s", "-s", str(LUA), url, "--", str(bodies), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRKJSON "))
    res: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    res["rps"] = round(res["requests"] / (res["duration_us"] / 1e6), 1)
    res["ok"] = res["codes"].get("202", 0)
    return res


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    return subprocess.Popen([spy, "record", "--subprocesses", "--format", "raw", "--rate", "200",
                             "--duration", str(seconds), "--nonblocking", "-o", str(out),
                             "--pid", str(pid)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                  if " (" in f else f for f in stack.split(";")[1:]]
        total += n
        if frames:
            selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = lambda c: [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self_pct": pct(selfc), "inclusive_pct": pct(incl)}


def measure(label: str, sysm: System, port: int, bodies: Path, args: argparse.Namespace,
            cfg: dict[str, Any], prof: bool) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/webhooks/callrail/acme"
    wrk(url, bodies, args.warmup, args.connections, args.wrk_threads)
    time.sleep(0.5)  # let requests still in the server finish before the flush
    flush(args.redis)
    spy = None
    prof_file = Path(tempfile.mkdtemp(prefix="rb-prof-")) / f"{label}.txt"
    if prof:
        master = next(p for n, p in sysm.procs.items())
        spy = profile(master.pid, int(args.duration), prof_file)
        time.sleep(0.5)
    cpu_before, redis_before = _cpu(sysm), _redis_cpu(args.redis)
    res = wrk(url, bodies, args.duration, args.connections, args.wrk_threads)
    cpu_after, redis_after = _cpu(sysm), _redis_cpu(args.redis)
    res["server_cpu_s"] = round(cpu_after - cpu_before, 2)
    res["redis_cpu_s"] = round(redis_after - redis_before, 2)
    res["app"] = label
    res.update({k: cfg[k] for k in ("worker_class", "workers", "threads")})
    if spy is not None:
        spy.wait(timeout=args.duration + 30)
        if prof_file.exists():
            res["profile"] = summarize_profile(prof_file)
            res["profile_file"] = str(prof_file)
    return res


def _redis_cpu(url: str) -> float:
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _cpu(sysm: System) -> float:
    total = 0.0
    for proc in sysm.procs.values():
        try:
            p = psutil.Process(proc.pid)
            for q in [p, *p.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_app(label: str, cfg: dict[str, Any], bodies: Path, args: argparse.Namespace,
            prof: bool) -> dict[str, Any]:
    flush(args.redis)
    server = cfg["base" if label == "baseline" else "ours"]
    if label == "baseline":
        sysm = System(redis_url=args.redis)
        port = free_port()
        sysm._spawn("baseline", [str(BIN / "gunicorn"), *gunicorn_args(server), "--bind",
                                 f"127.0.0.1:{port}", "bench.baseline_app:app"])
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok,
                 what="baseline web")
    else:
        sysm = System(redis_url=args.redis, env_extra=dict(NO_INTAKE_LIMIT))
        sysm.start_web(workers=server["workers"], threads=server["threads"],
                       server="granian" if server["worker_class"] == "granian" else "gunicorn")
        port = sysm.web_port
    try:
        return measure(label, sysm, port, bodies, args, server, prof)
    finally:
        teardown(sysm, args.redis)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="Redis URL of a db this benchmark may FLUSH (default db 14)")
    p.add_argument("--configs", nargs="+", type=parse_config,
                   default=[parse_config(c) for c in ("granian:2", "granian:2/sync:4")],
                   help="OURS[/BASE], each sync:W, gthread:W:T or granian:W (ours only); "
                        "default: granian:2 granian:2/sync:4")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (1 leaves more of the 2 cores to the servers)")
    p.add_argument("--bodies", type=int, default=150000,
                   help="unique signed bodies to prepare (more than one run sends)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each setting this many times, alternating which app goes "
                        "first (ABBA), and report the median ratio")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the rilla-bridge workers during each measurement")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="rb-bench-"))
    bodies = tmp / "bodies.tsv"
    make_bodies(args.bodies, bodies)
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    try:
        for cfg, rep in [(c, r) for c in args.configs for r in range(args.repeat)]:
            if rep % 2 == 0:
                base = run_app("baseline", cfg, bodies, args, False)
                ours = run_app("rilla-bridge", cfg, bodies, args, args.profile)
            else:   # the other order, so drift over a run favours neither app
                ours = run_app("rilla-bridge", cfg, bodies, args, args.profile)
                base = run_app("baseline", cfg, bodies, args, False)
            results += [base, ours]
            for r in (base, ours):
                if r["app"] == "rilla-bridge" and (r["wrapped"] or r["codes"].get("200")):
                    print(f"WARNING: {r['app']} ran out of unique bodies "
                          f"(raise --bodies)", file=sys.stderr)
            ratio = round(ours["rps"] / base["rps"], 3) if base["rps"] else None
            row = {"config": cfg["name"], "baseline req/s": base["rps"],
                   "baseline p50 ms": base["latency_us"]["p50"] / 1000,
                   "baseline p99 ms": base["latency_us"]["p99"] / 1000,
                   "ours req/s": ours["rps"], "ours p50 ms": ours["latency_us"]["p50"] / 1000,
                   "ours p99 ms": ours["latency_us"]["p99"] / 1000, "ratio": ratio,
                   "ours non-202": ours["requests"] - ours["ok"],
                   "ours cpu s/1k req": round(1000 * ours["server_cpu_s"] / ours["requests"], 2),
                   "base cpu s/1k req": round(1000 * base["server_cpu_s"] / base["requests"], 2),
                   "ours redis cpu s/1k": round(1000 * ours["redis_cpu_s"] / ours["requests"], 2),
                   "base redis cpu s/1k": round(1000 * base["redis_cpu_s"] / base["requests"], 2)}
            rows.append(row)
            print(table([row], list(row)).splitlines()[-1] if len(rows) > 1 else
                  table([row], list(row)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(rows, key=lambda r: (r["ratio"] or 0, r["ours req/s"]))
    fastest = max(rows, key=lambda r: r["ours req/s"])
    cols = list(rows[0])
    print()
    print(f"intake @ {args.connections} connections, {args.duration:g}s each, "
          f"{os.cpu_count()} CPUs; targets: ratio >= 0.8, p99 < 50 ms")
    print(table(rows, cols))
    print(f"best ratio: {best['config']} ({best['ratio']}); fastest rilla-bridge: "
          f"{fastest['config']} ({fastest['ours req/s']} req/s, p99 {fastest['ours p99 ms']} ms)")
    if args.repeat > 1:
        for cfg in args.configs:
            ratios = sorted(r["ratio"] for r in rows if r["config"] == cfg["name"])
            print(f"{cfg['name']}: median ratio {statistics.median(ratios):.3f} over "
                  f"{len(ratios)} runs (min {ratios[0]}, max {ratios[-1]})")
    for r in results:
        if "profile" in r:
            print(f"\nprofile of rilla-bridge ({r['worker_class']} w={r['workers']}), "
                  f"{r['profile']['samples']} samples, inclusive %:")
            for name, pct in r["profile"]["inclusive_pct"]:
                print(f"  {pct:5.1f}  {name}")
    path = write_results("intake", {"machine": machine(), "command": rerun_command(),
                                    "args": {k: v for k, v in vars(args).items()},
                                    "rows": rows, "runs": results})
    print(f"\nresults: {path.relative_to(ROOT)}\nrerun:   {rerun_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
