"""Issue 10: Redis holds the work, a SQL database holds the history.

Posts N ordinary post-call webhooks (3.1 KB signed bodies, each its own call) through the web
to workers that deliver to the Rilla sandbox, with the ``history`` process writing to a
PostgreSQL database of the run's own, and reports:

* Redis bytes per finished event: ``used_memory`` after every event is delivered and its
  history written (and a few seconds more), minus before, over N. Dedup keys, call states,
  the Bloom filter of forgotten calls, everything still in Redis counts;
* database bytes per event (``pg_total_relation_size`` of the history tables over N);
* the time from each event's delivery (the sandbox's ``created_at``) to its history row
  showing it delivered (polled every 250 ms), p50 / p99 / max;
* the delivery rate over the run.

Loopback only; Redis db 14 is flushed and the database dropped at the end.

    .venv/bin/python -m bench.history --events 100000
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from typing import Any

import redis
import sqlalchemy as sa

from bench.common import (
    ACME_RILLA_KEY,
    DEFAULT_REDIS,
    NO_INTAKE_LIMIT,
    BodyFactory,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    throwaway_postgres,
    write_results,
)
from bench.delivery import Poster, pct
from tests.system import System

TABLES = ("events", "timeline", "calls", "dead_letters", "audit_log")


class HistoryWatch:
    """Polls the history for delivered events: when each one first shows there."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cursor = 0.0
        q = sa.text("SELECT id, finished_at FROM events WHERE status = 'delivered' "
                    "AND finished_at >= :c")
        while not self.stop.wait(0.25):
            now = time.time()
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(q, {"c": cursor}).all()
            except sa.exc.SQLAlchemyError:
                continue   # the tables appear once the history process migrated them
            for eid, finished in rows:
                self.seen.setdefault(eid, now)
                cursor = max(cursor, float(finished) - 30)


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    flush(args.redis)
    client = redis.Redis.from_url(args.redis)
    with throwaway_postgres() as url:
        return _measure(args, client, url)


def _measure(args: argparse.Namespace, client: redis.Redis, url: str) -> dict[str, Any]:
    sysm = System(redis_url=args.redis, database_url=url, env_extra=dict(NO_INTAKE_LIMIT))
    watch = HistoryWatch(url)
    try:
        sysm.start_rilla_sandbox(ACME_RILLA_KEY, latency_ms=args.latency_ms, wait=False)
        sysm.start_web(workers=2, wait=False)
        for k in range(args.processes):
            sysm.start_worker(name=f"worker{k}", concurrency=200, wait=False)
        sysm.start_scheduler(wait=False)
        sysm.start_history(wait=False)
        sysm.ready()
        time.sleep(2)
        used_before = int(client.info("memory")["used_memory"])
        watch.thread.start()
        poster = Poster(sysm.web)
        poster.factory = BodyFactory(secrets.token_hex(4))
        t0 = time.time()
        for start in range(0, args.events, 5000):
            poster.burst(start, min(5000, args.events - start))
            print(f"  posted {min(start + 5000, args.events)} / {args.events}", flush=True)
        accepted = poster.codes.get(202, 0)
        print(f"  answers: {dict(poster.codes)}", flush=True)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            ok = int(sysm.sandbox("stats")["by_status"].get("200", 0))
            if ok >= accepted and len(watch.seen) >= accepted:
                break
            time.sleep(1)
        t_done = time.time()
        time.sleep(args.settle)
        info = client.info("memory")
        used_after = int(info["used_memory"])
        watch.stop.set()
        with watch.engine.connect() as conn:
            db_bytes = {t: int(conn.execute(sa.text("SELECT pg_total_relation_size(:t)"),
                                            {"t": t}).scalar_one()) for t in TABLES}
            rows = int(conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one())
        created = {a["event_id"]: a["_sandbox"]["created_at"] for a in sysm.sandbox(
            "appointments", params={"api_key": ACME_RILLA_KEY})}
        by_call = {f"callrail-{poster.factory.rid(i)}": i for i in range(args.events)}
        lags = []
        # The history's event id is ours; the sandbox's is Rilla's (callrail-<call>): join
        # them through the history rows' call ids.
        with watch.engine.connect() as conn:
            ids: dict[str, str] = dict(
                conn.execute(sa.text("SELECT id, call_id FROM events")).all())
        for eid, seen_at in watch.seen.items():
            rilla_id = f"callrail-{ids.get(eid)}"
            if rilla_id in created and rilla_id in by_call:
                lags.append(seen_at - created[rilla_id])
        keys_left: dict[str, int] = {}
        for k in client.scan_iter(count=1000):
            name_k = k.decode().split(":")[1] if k.startswith(b"rb:") else k.decode()
            keys_left[name_k] = keys_left.get(name_k, 0) + 1
        row = {"events": accepted, "Redis B/event": round((used_after - used_before) / accepted),
               "DB B/event": round(sum(db_bytes.values()) / accepted), "history rows": rows,
               "lag p50 s": round(pct(lags, 50), 2), "lag p99 s": round(pct(lags, 99), 2),
               "lag max s": round(max(lags), 2), "deliveries/s": round(
                   accepted / (max(created.values()) - min(created.values())), 1),
               "wall s": round(t_done - t0, 1)}
        print(table([row], list(row)), flush=True)
        return {"row": row, "db_bytes": db_bytes, "redis_keys_left": keys_left,
                "used_before": used_before, "used_after": used_after}
    finally:
        watch.stop.set()
        watch.engine.dispose()
        teardown(sysm, args.redis)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", default=DEFAULT_REDIS)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--latency-ms", type=int, default=100)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds after the last history row before Redis is measured")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    out = one_run(args)
    path = write_results("history", {"args": vars(args), "machine": machine(), **out})
    print(f"\nRedis keys left by kind: {out['redis_keys_left']}")
    print(f"database bytes by table: {out['db_bytes']}")
    print(f"\nresults: {path}\nrerun:   {rerun_command()}")


if __name__ == "__main__":
    main()
