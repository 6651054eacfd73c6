"""Issue 11: the on-call console and admin API on a full history database.

Stores ``--events`` events (default 200,000, received over the last 24 hours across 20
tenants: 87 % delivered, 3 % skipped, 10 % dead) with two timeline entries each, their dead
letters (20,000 open, three reasons) and an audit log, straight into a PostgreSQL database of
the run's own with COPY (setup only: the system writes history through Redis and the
history process). Then, against the real web process (granian) on that database:

1. **queries**: every console page and admin API query, ``--repeat`` times each, one at a
   time: p50 / p95 / max (target p95 < 300 ms). The overview is cached 10 s per process, so
   it is also timed uncached (``Operations.overview`` on a fresh instance each time);
2. **intake while an operator pages** (``--intake N``): N signed webhooks at ``--rate``/s,
   quiet; while one operator walks through the console pages reading each for ``--think``
   seconds (``--rounds`` quiet / operator pairs, alternating); and while one walks through
   them without any pause (a worst case no person reaches): p50 / p99 of the 202s (target:
   p99 within 10 % of quiet). ``--interleave N`` adds N runs in which quiet and operator
   alternate every ``--window`` seconds within the run, the webhooks of each kind of window
   compared: the machine's speed drifts between separate runs, not within seconds. Each
   window's ``steal`` (CPU the virtual machine's host gave elsewhere) is recorded, and the
   comparison is also made over the window pairs the host left alone (``calm``): a host that
   takes our vCPUs away for 100-500 ms sets the p99 of whichever window it falls in.
   ``--pool FILES`` sums up the runs of several result files with a 95 % interval.

3. **bulk replay** (``--replay N``): the seed makes exactly N dead letters ``rilla_rejected``;
   the Rilla sandbox, two workers, the scheduler (whose job thread runs bulk jobs) and the
   history process start; 20 webhooks/s of another tenant are delivered for
   ``--live-seconds`` (quiet), then a replay of the N is planned and confirmed through the
   admin API and the same live run repeats beside it: how long the job and the deliveries
   take against N / ``--bulk-rate``, and the live deliveries' p50 / p99 (sandbox
   ``created_at`` minus the POST), quiet and during (target: p99 under twice quiet).

Loopback only; the database is dropped and the Redis db flushed at the end (the processes'
logs are kept in ``bench/results/console-logs/``).

    .venv/bin/python -m bench.console --events 200000 --dead 20000 --replay 10000
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis as redis_lib
import requests
import sqlalchemy as sa

from app.operator_process import own_scheduling_group
from bench.common import (
    DEFAULT_REDIS,
    RESULTS,
    BodyFactory,
    cpu_seconds,
    cpu_used,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    write_results,
)
from bench.delivery import pct
from rilla_bridge.clock import SystemClock
from rilla_bridge.history.db import make_engine
from rilla_bridge.history.migrate import upgrade_engine
from rilla_bridge.keys import LAST_WEBHOOK, OVERVIEW, last_webhook_field
from rilla_bridge.operations import Operations
from rilla_bridge.providers.callrail import signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.system import ADMIN_TOKEN, System

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TENANT_COUNT = 20
# A window pair in which the host took more of our vCPUs than this (``steal``, all CPUs,
# per window) is left out of the "calm" comparison; on a quiet host a 2 s window has 0-40 ms.
STEAL_CALM_MS = 50
FIRST = ("Jordan", "Casey", "Riley", "Morgan", "Avery", "Quinn", "Jamie", "Drew", "Parker",
         "Reese", "Sam", "Taylor", "Alex", "Robin", "Kai", "Dana")
LAST = ("Pike", "Jones", "Nguyen", "Garcia", "Smith", "Patel", "Kim", "Lopez", "Brown",
        "Miller", "Davis", "Wilson", "Moore", "Clark", "Lewis", "Young")
REASONS = (("rilla_rejected", 422, "Rilla answered 422: User email is not in Rilla", 0.6),
           ("retries_exhausted", 503, "Rilla kept failing (503) for 24 h", 0.3),
           ("transform", None, "no recording URL and deliver_unrecorded is off", 0.1))


def tenants_toml() -> str:
    out = []
    for i in range(TENANT_COUNT):
        slug = f"t{i:02d}"
        out.append(f'[tenants.{slug}]\nrilla_api_key = "{slug}-rilla-key-000000"\n'
                   f'default_user_email = "office@{slug}.example"\n'
                   f'[tenants.{slug}.callrail]\nsigning_key = "{slug}-signing-key-00000"\n'
                   f'[tenants.{slug}.callingly]\nwebhook_token = "{slug}-callingly-token-00"\n')
    return "\n".join(out)


def seed(url: str, n_events: int, n_dead: int, now: float, rejected: int = 0
         ) -> dict[str, Any]:
    """COPY the history in; returns what the queries will look for, and each tenant's
    newest event (``last_webhook``) for Redis, where intake would have left it."""
    rng = random.Random(11)
    factory = BodyFactory("seed")
    weights = [30.0] + [70.0 / (TENANT_COUNT - 1)] * (TENANT_COUNT - 1)
    slugs = [f"t{i:02d}" for i in range(TENANT_COUNT)]
    dead_every = max(1, n_events // max(1, n_dead))
    engine = make_engine(url)
    raw = engine.raw_connection()
    sample: dict[str, Any] = {}
    ev_cols = ("id", "tenant", "source", "kind", "call_id", "received_at", "status", "reason",
               "attempts", "last_status", "finished_at", "size", "body", "last_payload",
               "customer_phone", "customer_name", "rep_email", "last_record")
    t0 = time.monotonic()
    ev_rows: list[tuple[Any, ...]] = []
    tl_rows: list[tuple[Any, ...]] = []
    dl_rows: list[tuple[Any, ...]] = []
    dead = 0
    last: dict[str, float] = {}
    for i in range(n_events):
        t = now - 86400 + 86400 * (i + rng.random()) / n_events
        tenant = rng.choices(slugs, weights)[0]
        eid = f"ev_{int(t * 1000):012x}{i:016x}"
        call = f"CALseed{i:010d}"
        is_dead = i % dead_every == 0 and dead < n_dead
        status = "dead" if is_dead else ("skipped" if rng.random() < 0.03 else "delivered")
        phone = f"+1720555{rng.randrange(10000):04d}"
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        rep = f"rep{rng.randrange(40)}@{tenant}.example"
        body = factory.body(i) if is_dead else None
        rec = f"{int(t * 1000)}-{i}"
        code, status_code, reason = "", None, None
        if is_dead:
            if rejected:   # exactly ``rejected`` rilla_rejected ones (the replay stage's)
                code, status_code, reason, _ = REASONS[0 if dead < rejected else
                                                       1 + dead % 2]
            else:
                code, status_code, reason, _ = rng.choices(REASONS,
                                                           [r[3] for r in REASONS])[0]
            dead += 1
        ev_rows.append((eid, tenant, "callrail", "post_call", call, t, status, reason, 1,
                        status_code or 200, t + 0.2, 3100, body,
                        json.dumps({"event_id": f"callrail-{call}"}), phone, name, rep, rec))
        tl_rows.append((rec, 0, eid, t + 0.1, "attempt", json.dumps(
            {"n": 1, "op": "upsert", "status": status_code or 200, "ms": 90})))
        tl_rows.append((rec, 1, eid, t + 0.2, "dead_lettered" if is_dead else status,
                        json.dumps({"reason": reason} if reason else {})))
        if is_dead:
            dl_rows.append((f"{int(t * 1000) + 200}-{i}", eid, tenant, "callrail",
                            "post_call", call, f"callrail-{call}", code, reason, status_code,
                            reason, 1, t, t + 0.2,
                            json.dumps({"event_id": f"callrail-{call}"})))
        last[last_webhook_field(tenant, "callrail")] = t
        if i == n_events // 2:
            sample = {"event_id": eid, "phone": phone, "name": name.split()[1].lower(),
                      "rep": rep, "call_id": call, "tenant": tenant}
    au_rows = [(f"{int(now * 1000) - i}-0", now - i * 100, "console:bench", "tenant.pause",
                json.dumps({"tenant": "t01"}), 1) for i in range(500)]
    copies = (
        (f"COPY events ({', '.join(ev_cols)}) FROM STDIN", ev_rows),
        ("COPY timeline (record, idx, event_id, t, what, data) FROM STDIN", tl_rows),
        ("COPY dead_letters (id, event_id, tenant, source, kind, call_id, rilla_event_id, "
         "reason_code, reason, status_code, response_body, attempts, first_failure_at, "
         "failed_at, payload) FROM STDIN", dl_rows),
        ("COPY audit_log (id, at, actor, action, selection, count) FROM STDIN", au_rows))
    try:
        cur = raw.cursor()
        for statement, rows in copies:
            with cur.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        raw.commit()
    finally:
        raw.close()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM ANALYZE")
    engine.dispose()
    sample["seconds"] = round(time.monotonic() - t0, 1)
    sample["dead"] = dead
    sample["last_webhook"] = last   # what intake's script would have left in rb:last_webhook
    return sample


def sign_in(web: str) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{web}/console/sign-in", timeout=10).text
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    r = s.post(f"{web}/console/sign-in", data={"csrf": token.group(1), "operator": "bench",
                                               "token": ADMIN_TOKEN}, timeout=10,
               allow_redirects=False)
    assert r.status_code == 302, r.text
    return s


def targets(sample: dict[str, Any], web: str, api: requests.Session) -> list[tuple[str, str]]:
    first = api.get(f"{web}/admin/api/events", params={"limit": 50}, timeout=30).json()
    nxt = first["next"]
    group = api.get(f"{web}/admin/api/dead-letters/groups", timeout=30).json()["groups"][0]
    g = (f"group_tenant={group['tenant']}&group_reason={group['reason_code']}"
         f"&group_status={group['status_code'] if group['status_code'] is not None else 'none'}")
    t = sample["tenant"]
    pages = [
        ("page overview", "/console/"),
        ("page events", "/console/events"),
        ("page events, next page", f"/console/events?before={nxt}"),
        ("page events by phone", f"/console/events?phone={sample['phone'][2:]}"),
        ("page events by name (7 days)", f"/console/events?name={sample['name']}"),
        ("page events by rep", f"/console/events?rep_email={sample['rep']}"),
        ("page events by call id", f"/console/events?call_id={sample['call_id']}"),
        ("page events tenant+dead", f"/console/events?tenant={t}&status=dead"),
        ("page event detail", f"/console/events/{sample['event_id']}"),
        ("page dead-letter groups", "/console/dead-letters"),
        ("page dead-letter group", f"/console/dead-letters/list?{g}"),
        ("page dead letters by tenant", f"/console/dead-letters/list?tenant={t}"),
        ("page retries", "/console/retries"),
        ("page tenants", "/console/tenants"),
        ("page audit", "/console/audit"),
    ]
    apis = [
        ("api overview", "/admin/api/overview"),
        ("api events by phone", f"/admin/api/events?phone={sample['phone']}"),
        ("api events by name", f"/admin/api/events?name={sample['name']}"),
        ("api events tenant+status", f"/admin/api/events?tenant={t}&status=delivered"),
        ("api event detail", f"/admin/api/events/{sample['event_id']}"),
        ("api dead-letter groups", "/admin/api/dead-letters/groups"),
        ("api dead letters (group)", f"/admin/api/dead-letters?{g}"),
        ("api tenants", "/admin/api/tenants"),
        ("api retries", "/admin/api/retries"),
        ("api jobs", "/admin/api/jobs"),
        ("api audit", "/admin/api/audit"),
    ]
    return pages + apis


def time_queries(web: str, sample: dict[str, Any], repeat: int, db_url: str,
                 tenants_text: str) -> list[dict[str, Any]]:
    console = sign_in(web)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    rows = []
    for name, path in targets(sample, web, api):
        s = api if name.startswith("api") else console
        ms = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = s.get(f"{web}{path}", timeout=30)
            ms.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, (name, r.status_code, r.text[:300])
        rows.append({"query": name, "p50_ms": round(pct(ms, 50), 1),
                     "p95_ms": round(pct(ms, 95), 1), "max_ms": round(max(ms), 1)})
    # A bulk plan (counts the group in SQL) and the overview without its cache.
    ms = []
    group = api.get(f"{web}/admin/api/dead-letters/groups", timeout=30).json()["groups"][0]
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = api.post(f"{web}/admin/api/jobs", timeout=30, json={"action": "replay", "selection": {
            "group": {k: group[k] for k in ("tenant", "reason_code", "status_code")}}})
        ms.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 201, r.text
        api.post(f"{web}/admin/api/jobs/{r.json()['id']}/cancel", timeout=30)
    rows.append({"query": f"api plan replay of a group ({r.json()['total']})",
                 "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
                 "max_ms": round(max(ms), 1)})
    settings = Settings(database_url=db_url, admin_token=ADMIN_TOKEN)
    engine = make_engine(db_url)
    client = redis_lib.Redis.from_url(sample["redis"])
    ms = []
    for _ in range(repeat):
        ops = Operations(settings, client, engine, SystemClock(),
                         parse_tenants(tenants_text, env={}))
        t0 = time.perf_counter()
        ops.publish_overview()   # what the scheduler's job does every 10 s
        ms.append((time.perf_counter() - t0) * 1000)
    engine.dispose()
    rows.append({"query": "overview computed (the scheduler's job)",
                 "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
                 "max_ms": round(max(ms), 1)})
    return rows


class Poster:
    """Signed CallRail webhooks for tenant t00, from many threads (a session each): ``post``
    sends the i-th and returns its latency in ms; ``codes`` counts the answers."""

    def __init__(self, web: str, start: int) -> None:
        self.factory = BodyFactory(secrets.token_hex(3))
        self.url = f"{web}/webhooks/callrail/t00"
        self.start = start
        self.codes: dict[int, int] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    def post(self, i: int) -> float:
        s = getattr(self._local, "s", None) or requests.Session()
        self._local.s = s
        raw = self.factory.body(self.start + i)
        sig = signature("t00-signing-key-00000", raw)
        t = time.perf_counter()
        code = s.post(self.url, data=raw, headers={"Signature": sig}, timeout=30).status_code
        ms = (time.perf_counter() - t) * 1000
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + 1
        return ms


class Browser:
    """The operator's browser: a process of its own (a browser is not in the bench's
    interpreter, so its requests and their parsing take no GIL from the posting threads),
    signed in before ``start`` returns. Spawned, not forked: a forked child shares this
    process's large heap copy-on-write, so for as long as it lives every page the posting
    threads write is copied first (a fault each), a cost of the bench's own, not of the
    server's. ``stop`` ends it and returns the pages it read and its CPU seconds."""

    def __init__(self, target: Any, *args: Any) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.stop_flag = spawn.Event()
        self.pages = spawn.Value("i", 0)
        self.cpu = spawn.Value("d", 0.0)
        self.proc = spawn.Process(target=_elsewhere,
                                  args=(target, *args, self.stop_flag, self.pages, self.cpu))

    def start(self) -> Browser:
        self.proc.start()
        time.sleep(3.0)   # an interpreter to start and sign in
        return self

    def stop(self) -> tuple[int, float]:
        self.stop_flag.set()
        self.proc.join(timeout=60)
        return int(self.pages.value), round(self.cpu.value, 2)


def steal_ms() -> float:
    """CPU time this virtual machine's host gave to others while our vCPUs wanted it
    (``steal`` of /proc/stat, all CPUs), in ms since boot; 0 where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _elsewhere(target: Any, *args: Any) -> None:
    """The browser's process, run as far from the server as this machine allows: an
    operator's browser is on a laptop, not on the dyno. Its own session (the kernel's
    ``sched_autogroup`` shares CPU between sessions: spawned from the bench, it would take its
    share from the posting threads) at the lowest priority, so reading a page (a 360 KB
    overview takes its ``requests`` a few milliseconds) does not delay the webhooks being
    timed; what the server spends on the page is still all on these two cores."""
    own_scheduling_group(19)
    os.nice(19)
    target(*args)


def page_paths(sample: dict[str, Any], web: str) -> list[str]:
    """The console pages an operator reads (``targets`` less the API)."""
    return [p for name, p in targets(sample, web, _api()) if name.startswith("page")]


def cpu_by_part(sysm: System, redis_url: str) -> dict[str, float]:
    """CPU seconds so far of each part on this machine: the web workers (granian's process and
    its workers), the operator process, every PostgreSQL process, Redis, the scheduler, and
    this process (the load generator). Read before and after a run and subtract."""
    import psutil

    out = dict.fromkeys(("web", "operator", "postgres", "redis", "scheduler"), 0.0)
    web = psutil.Process(sysm.procs["web"].pid)
    for p in [web, *web.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            part = "operator" if "operator_process" in " ".join(p.cmdline()) else "web"
            out[part] += t.user + t.system
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("postgres", "postmaster"):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out["postgres"] += t.user + t.system
    out.update(cpu_seconds({"scheduler": sysm.procs["scheduler"]}, redis_url))
    out["bench"] = time.process_time()
    return out


def intake_run(web: str, n: int, rate: float, operator: bool, sample: dict[str, Any],
               start: int, sysm: System, think: float = 0.0) -> dict[str, Any]:
    poster = Poster(web, start)
    lat: list[float] = []

    def post(i: int) -> None:
        lat.append(poster.post(i))

    # Quiet runs have the browser too, signed in and idle (the console open, nobody
    # clicking): with it only in the operator runs, its mere presence on the two cores came
    # out in the comparison.
    browser = Browser(_page_through, web, page_paths(sample, web) if operator else [],
                      think).start()
    pool = ThreadPoolExecutor(8)
    cpu0 = cpu_by_part(sysm, sample["redis"])
    t0 = time.monotonic()
    futures = []
    for k in range(n):
        slot = t0 + k / rate
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(post, k))
    for f in futures:
        f.result()
    cpu = cpu_used(cpu0, cpu_by_part(sysm, sample["redis"]))
    pages, browser_cpu = browser.stop()
    pool.shutdown()
    who = ("quiet" if not operator else
           f"operator, {think:g} s between pages" if think else "operator, no pause")
    return {"operator": who, "posts": n, "codes": poster.codes,
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(max(lat), 2), "operator_pages": pages,
            "cpu_s": {**cpu, "browser": browser_cpu}}


def live_run(sysm: System, n: int, rate: float, tenant: str = "t01") -> dict[str, Any]:
    """n webhooks of ``tenant`` at ``rate``/s; each one's delivery latency (the Rilla
    sandbox's created_at minus the moment it was posted)."""
    factory = BodyFactory(secrets.token_hex(3))
    key = f"{tenant}-signing-key-00000"
    sent: dict[str, float] = {}
    lock = threading.Lock()
    local = threading.local()

    def post(i: int) -> None:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        raw = factory.body(i)
        t0 = time.time()
        r = s.post(f"{sysm.web}/webhooks/callrail/{tenant}", data=raw,
                   headers={"Signature": signature(key, raw)}, timeout=30)
        if r.status_code == 202:
            with lock:
                sent[f"callrail-{factory.rid(i)}"] = t0

    pool = ThreadPoolExecutor(4)
    t0 = time.monotonic()
    futures = []
    for k in range(n):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(post, k))
    for f in futures:
        f.result()
    pool.shutdown()
    deadline = time.monotonic() + 120
    created: dict[str, float] = {}
    while time.monotonic() < deadline:
        appts = sysm.sandbox("appointments", params={"api_key": f"{tenant}-rilla-key-000000"})
        created = {a["event_id"]: a["_sandbox"]["created_at"] for a in appts}
        if all(e in created for e in sent):
            break
        time.sleep(0.5)
    lat = [1000 * (created[e] - t) for e, t in sent.items() if e in created]
    return {"posted": n, "delivered": len(lat), "p50_ms": round(pct(lat, 50), 1),
            "p99_ms": round(pct(lat, 99), 1), "max_ms": round(max(lat), 1)}


def replay_stage(sysm: System, args: argparse.Namespace, backlog: int) -> dict[str, Any]:
    """Bulk replay of the ``--replay`` rilla_rejected dead letters through the whole system
    while live webhooks of another tenant are delivered beside it."""
    keys = [f"t{i:02d}-rilla-key-000000" for i in range(TENANT_COUNT)]
    sysm.start_rilla_sandbox(*keys, latency_ms=args.rilla_latency_ms, wait=False)
    for k in range(args.workers):
        sysm.start_worker(name=f"worker{k}", concurrency=100, wait=False)
    if "scheduler" not in sysm.procs:
        sysm.start_scheduler(wait=False)
    sysm.start_history(wait=False)
    sysm.ready()
    # The intake stage's webhooks (stored, never delivered: no worker ran) go first, so the
    # quiet live run is quiet.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and int(
            sysm.sandbox("stats")["by_status"].get("200", 0)) < backlog:
        time.sleep(1)
    base = int(sysm.sandbox("stats")["by_status"].get("200", 0))
    n_live = int(args.live_rate * args.live_seconds)
    quiet = live_run(sysm, n_live, args.live_rate)
    api = _api()
    plan = api.post(f"{sysm.web}/admin/api/jobs", timeout=60, json={
        "action": "replay", "selection": {"filter": {"reason": "rilla_rejected"}}}).json()
    t_confirm = time.monotonic()
    api.post(f"{sysm.web}/admin/api/jobs/{plan['id']}/confirm", timeout=30)
    time.sleep(2)
    client = redis_lib.Redis.from_url(args.redis)
    depths: list[int] = []
    watching = threading.Event()

    def watch() -> None:   # Celery's events queue while the replay and live run side by side
        while not watching.wait(0.5):
            depths.append(int(client.llen("events")))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    during = live_run(sysm, n_live, args.live_rate)
    watching.set()
    watcher.join()
    during["events_queue_max"] = max(depths or [0])
    during["events_queue_mean"] = round(sum(depths) / max(1, len(depths)), 1)
    job: dict[str, Any] = {}
    deadline = time.monotonic() + plan["total"] / args.bulk_rate * 3 + 120
    while time.monotonic() < deadline:
        job = api.get(f"{sysm.web}/admin/api/jobs/{plan['id']}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(1)
    t_job = time.monotonic()
    while time.monotonic() < deadline:   # the last replays delivered
        ok = int(sysm.sandbox("stats")["by_status"].get("200", 0))
        if ok - base - 2 * n_live >= plan["total"]:
            break
        time.sleep(0.5)
    t_done = time.monotonic()
    replayed = int(sysm.sandbox("stats")["by_status"].get("200", 0)) - base - 2 * n_live
    return {"dead_letters": plan["total"], "job": {k: job.get(k) for k in (
                "status", "done", "processed", "note")},
            "bulk_rate_per_second": args.bulk_rate,
            "implied_seconds": round(plan["total"] / args.bulk_rate, 1),
            "job_seconds": round(t_job - t_confirm, 1),
            "all_delivered_seconds": round(t_done - t_confirm, 1),
            "replayed_delivered": replayed,
            "live_quiet": quiet, "live_during_replay": during,
            "live_p99_ratio": round(during["p99_ms"] / quiet["p99_ms"], 3)}


def _page_through(web: str, paths: list[str], think: float, stop: Any, done: Any,
                  cpu: Any) -> None:
    s = sign_in(web)
    t0 = time.process_time()
    try:
        if not paths:
            stop.wait()   # a quiet run: signed in, reading nothing
        while not stop.is_set():
            for p in paths:
                if stop.is_set():
                    return
                s.get(f"{web}{p}", timeout=30)
                with done.get_lock():
                    done.value += 1
                if think:
                    stop.wait(think)
    finally:
        cpu.value = time.process_time() - t0   # the "browser": not on the server in production


def interleaved_run(web: str, n: int, rate: float, sample: dict[str, Any], start: int,
                    window: float, think: float, sysm: System, page_offset: int = 0,
                    paths: list[str] | None = None) -> dict[str, Any]:
    """N webhooks at ``rate``/s while the operator pages in every other ``window`` seconds
    (one page every ``think`` seconds, all started early enough in their window to end in it)
    and is idle in the rest: the p99 of the webhooks sent in operator windows against those
    sent in quiet ones. Quiet and operator alternate every few seconds, so both see the same
    minutes of the machine (whose speed drifts by ±20 % between runs of 20 s here: separate
    runs compare the machine's moments as much as the operator). The pages read go on from
    ``page_offset`` in ``page_paths``' order (or ``paths``'), so successive runs read all of
    them."""
    poster = Poster(web, start)
    sent: list[tuple[float, float]] = []   # (send time from t0, latency ms)
    paths = paths or page_paths(sample, web)
    todo = multiprocessing.get_context("spawn").Queue()
    browser = Browser(_page_on_request, web, todo).start()

    def post(i: int, at: float) -> None:
        sent.append((at, poster.post(i)))

    # The pages: at these offsets of every operator window (odd windows).
    offsets = [k * think for k in range(max(1, int((window - 0.25) / think) + 1))
               if k * think <= window - 0.25]
    pool = ThreadPoolExecutor(8)
    cpu0 = cpu_by_part(sysm, sample["redis"])
    t0 = time.monotonic()
    page_times = sorted(w * window + o for w in range(1, int(n / rate / window) + 2, 2)
                        for o in offsets)
    futures, pages_asked = [], 0
    steal = [steal_ms()]   # at the start of each window, and at the end
    for i in range(n):
        slot = i / rate
        while pages_asked < len(page_times) and page_times[pages_asked] <= slot:
            todo.put(paths[(page_offset + pages_asked) % len(paths)])
            pages_asked += 1
        delay = t0 + slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if int(slot // window) >= len(steal):
            steal.append(steal_ms())
        futures.append(pool.submit(post, i, slot))
    for f in futures:
        f.result()
    steal.append(steal_ms())
    stolen = [round(b - a) for a, b in itertools.pairwise(steal)]
    cpu = cpu_used(cpu0, cpu_by_part(sysm, sample["redis"]))
    todo.put(None)
    pages, browser_cpu = browser.stop()
    pool.shutdown()
    on = [ms for at, ms in sent if int(at // window) % 2 == 1]
    off = [ms for at, ms in sent if int(at // window) % 2 == 0]
    # The same without the windows in which the host took our vCPUs away (steal over
    # ``STEAL_CALM_MS``): each quiet window and the operator window after it are kept or
    # dropped together, so the operator's load cannot choose which of its windows count.
    calm_pairs = {w for w in range(0, len(stolen) - 1, 2)
                  if max(stolen[w], stolen[w + 1]) <= STEAL_CALM_MS}
    calm = [(at, ms) for at, ms in sent if int(at // window) // 2 * 2 in calm_pairs]
    calm_on = [ms for at, ms in calm if int(at // window) % 2 == 1]
    calm_off = [ms for at, ms in calm if int(at // window) % 2 == 0]
    # Where the operator windows' slow webhooks fall: sent within 50 ms after a page was
    # asked for (5 % of an operator window's time at one page a second), or elsewhere.
    slow = pct(off, 99)
    near = far = 0
    by_page: dict[str, int] = {}
    for at, ms in sent:
        if int(at // window) % 2 == 1 and ms > slow:
            asked = [k for k, pt in enumerate(page_times) if 0 <= at - pt < 0.05]
            if asked:
                near += 1
                page = paths[(page_offset + asked[-1]) % len(paths)][:48]
                by_page[page] = by_page.get(page, 0) + 1
            else:
                far += 1
    return {"window_s": window, "posts": n, "codes": poster.codes, "pages": pages,
            "quiet_n": len(off), "operator_n": len(on),
            "quiet_p50_ms": round(pct(off, 50), 2), "quiet_p99_ms": round(pct(off, 99), 2),
            "operator_p50_ms": round(pct(on, 50), 2), "operator_p99_ms": round(pct(on, 99), 2),
            "p99_ratio": round(pct(on, 99) / pct(off, 99), 3),
            "slow_near_page": near, "slow_elsewhere": far, "slow_near_by_page": by_page,
            "steal_ms_per_window": stolen, "calm_pairs": len(calm_pairs),
            "calm_quiet_p99_ms": round(pct(calm_off, 99), 2) if calm_off else None,
            "calm_operator_p99_ms": round(pct(calm_on, 99), 2) if calm_on else None,
            "cpu_s": {**cpu, "browser": browser_cpu}, "_on": on, "_off": off,
            "_calm_on": calm_on, "_calm_off": calm_off}


def _page_on_request(web: str, todo: Any, stop: Any, done: Any, cpu: Any) -> None:
    """The operator of ``interleaved_run``: reads each page it is asked for, as it is asked
    (``None``: done)."""
    s = sign_in(web)
    t0 = time.process_time()
    try:
        while (path := todo.get()) is not None:
            s.get(f"{web}{path}", timeout=30)
            with done.get_lock():
                done.value += 1
    finally:
        cpu.value = time.process_time() - t0


def _api() -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    return s


def pool(paths: list[str], resamples: int = 10_000) -> dict[str, Any]:
    """The interleaved runs of several result files together: the operator windows' p99
    against the quiet windows', as the ratio of the runs' mean p99s, with a bootstrap 95 %
    interval over runs (each run is one draw of the machine's minutes); over all windows,
    and over the window pairs in which the host took little CPU (``calm``, where recorded)."""
    runs, calm = [], []
    for path in paths:
        with open(path) as f:
            for r in json.load(f).get("interleaved", []):
                runs.append((r["quiet_p99_ms"], r["operator_p99_ms"]))
                if r.get("calm_quiet_p99_ms") and r.get("calm_operator_p99_ms"):
                    calm.append((r["calm_quiet_p99_ms"], r["calm_operator_p99_ms"]))
    if not runs:
        raise SystemExit("no interleaved runs in those files")

    def ratio(rs: list[tuple[float, float]]) -> float:
        return sum(o for _, o in rs) / sum(q for q, _ in rs)

    def summary(rs: list[tuple[float, float]]) -> dict[str, Any]:
        rng = random.Random(1)
        boot = sorted(ratio([rng.choice(rs) for _ in rs]) for _ in range(resamples))
        return {"runs": len(rs), "p99_ratio": round(ratio(rs), 3),
                "ci95": [round(boot[int(0.025 * resamples)], 3),
                         round(boot[int(0.975 * resamples) - 1], 3)],
                "median_run_ratio": round(statistics.median(o / q for q, o in rs), 3),
                "runs_over_1.10": sum(1 for q, o in rs if o / q > 1.10)}

    out = {"files": len(paths), **summary(runs)}
    if calm:
        out["calm"] = {"steal_calm_ms": STEAL_CALM_MS, **summary(calm)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", nargs="+", metavar="RESULTS_JSON",
                   help="only summarise the interleaved runs of these result files together "
                        "(ratio of mean p99s, bootstrap 95 %% interval over runs)")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--dead", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--intake", type=int, default=2000, help="webhooks per intake run (0: skip)")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="quiet / operator pairs of intake runs, alternating")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="also N runs of --intake webhooks with the operator paging in every "
                        "other --window seconds (quiet and operator on the same minutes)")
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--pages", nargs="+", metavar="PATH",
                   help="the console paths the interleaved runs' operator reads, in turn, "
                        "instead of every page (to tell which part of a page costs intake)")
    p.add_argument("--think", type=float, default=1.0,
                   help="seconds an operator spends on a page (the operator runs)")
    p.add_argument("--redis", default=DEFAULT_REDIS, help="a Redis db this run may flush")
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--replay", type=int, default=0,
                   help="dead letters to replay in bulk (0: skip that stage)")
    p.add_argument("--bulk-rate", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    p.add_argument("--live-rate", type=float, default=20.0)
    p.add_argument("--live-seconds", type=float, default=30.0)
    p.add_argument("--rilla-latency-ms", type=int, default=50)
    args = p.parse_args(argv)
    if args.pool:
        print(json.dumps(pool(args.pool), indent=2))
        return 0

    flush(args.redis)
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"rb_bench_console_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db_url = admin.url.set(database=name).render_as_string(hide_password=False)
    text = tenants_toml()
    sysm = System(args.redis, tenants=text, database_url=db_url,
                  env_extra={"BULK_RATE_PER_SECOND": str(args.bulk_rate)})
    result: dict[str, Any] = {"machine": machine(), "command": rerun_command(),
                              "events": args.events, "dead": args.dead}
    try:
        engine = make_engine(db_url)
        upgrade_engine(engine)
        engine.dispose()
        now = time.time()
        sample = seed(db_url, args.events, args.dead, now, rejected=args.replay)
        sample["redis"] = args.redis
        with redis_lib.Redis.from_url(args.redis) as r:
            r.hset(LAST_WEBHOOK, mapping=sample.pop("last_webhook"))
        print(f"seeded {args.events} events, {sample['dead']} dead letters in "
              f"{sample['seconds']} s", flush=True)
        # This process posts the webhooks: what the setup left in its heap made each of its
        # full garbage collections a 100 ms pause of every post under way, one or two per
        # intake run (whichever run it fell in, its p99 was that pause). Those objects are
        # kept out of the collector from here on.
        gc.collect()
        gc.freeze()
        sysm.start_web(workers=args.web_workers)
        # As deployed: the scheduler publishes the overview every 10 s for the web processes.
        sysm.start_scheduler()
        until_published = time.monotonic() + 30
        with redis_lib.Redis.from_url(args.redis) as r:
            while not r.exists(OVERVIEW) and time.monotonic() < until_published:
                time.sleep(0.2)
        rows = time_queries(sysm.web, sample, args.repeat, db_url, text)
        result["queries"] = rows
        print(table(rows, ["query", "p50_ms", "p95_ms", "max_ms"]), flush=True)
        if args.intake and args.rounds:
            # quiet and operator runs alternate (--rounds pairs): each pair's ratio is taken
            # on the same minutes of the machine; then one run with no pause at all
            runs = []
            # (in ABBA order: quiet first in even pairs, operator first in odd ones, so a
            # machine that drifts during the stage does not always favour the quiet run)
            for r in range(args.rounds):
                pair = [intake_run(sysm.web, args.intake, args.rate, operator, sample,
                                   (2 * r + k) * args.intake, sysm, think=args.think)
                        for k, operator in enumerate((r % 2 == 1, r % 2 == 0))]
                runs += sorted(pair, key=lambda run: run["operator"] != "quiet")
            runs.append(intake_run(sysm.web, args.intake, args.rate, True, sample,
                                   2 * args.rounds * args.intake, sysm))
            ratios = [runs[2 * r + 1]["p99_ms"] / runs[2 * r]["p99_ms"]
                      for r in range(args.rounds)]
            quiet = [run["p99_ms"] for run in runs[:-1:2]]
            result["intake"] = runs
            result["intake_p99_ratio"] = {"pairs": [round(x, 3) for x in ratios],
                                          "median": round(statistics.median(ratios), 3),
                                          "no_pause": round(runs[-1]["p99_ms"]
                                                            / statistics.median(quiet), 3)}
            print(table(runs, ["operator", "posts", "p50_ms", "p99_ms", "max_ms",
                               "operator_pages", "codes"]), flush=True)
            print("CPU seconds per run, by part:", flush=True)
            print(table([{"run": run["operator"], **run["cpu_s"]} for run in runs],
                        ["run", "web", "operator", "postgres", "redis", "scheduler",
                         "bench", "browser"]), flush=True)
            print(f"intake p99, operator {args.think:g} s per page / quiet, per pair: "
                  f"{', '.join(f'{x:.3f}' for x in ratios)} (median "
                  f"{statistics.median(ratios):.3f}); no pause / median quiet: "
                  f"{result['intake_p99_ratio']['no_pause']:.3f}", flush=True)
        if args.intake and args.interleave:
            inter: list[dict[str, Any]] = []
            for r in range(args.interleave):
                inter.append(interleaved_run(sysm.web, args.intake, args.rate, sample,
                                             (2 * args.rounds + 1 + r) * args.intake,
                                             args.window, args.think, sysm,
                                             page_offset=sum(x["pages"] for x in inter),
                                             paths=args.pages))
            on = [ms for r in inter for ms in r.pop("_on")]
            off = [ms for r in inter for ms in r.pop("_off")]
            calm_on = [ms for r in inter for ms in r.pop("_calm_on")]
            calm_off = [ms for r in inter for ms in r.pop("_calm_off")]
            result["interleaved"] = inter
            result["interleaved_pooled"] = {
                "quiet_n": len(off), "operator_n": len(on),
                "quiet_p99_ms": round(pct(off, 99), 2), "operator_p99_ms": round(pct(on, 99), 2),
                "p99_ratio": round(pct(on, 99) / pct(off, 99), 3)}
            if calm_on and calm_off:
                result["interleaved_calm"] = {
                    "steal_calm_ms": STEAL_CALM_MS, "quiet_n": len(calm_off),
                    "operator_n": len(calm_on), "quiet_p99_ms": round(pct(calm_off, 99), 2),
                    "operator_p99_ms": round(pct(calm_on, 99), 2),
                    "p99_ratio": round(pct(calm_on, 99) / pct(calm_off, 99), 3)}
            print(table(inter, ["window_s", "posts", "pages", "quiet_n", "quiet_p50_ms",
                                "quiet_p99_ms", "operator_n", "operator_p50_ms",
                                "operator_p99_ms", "p99_ratio", "slow_near_page",
                                "slow_elsewhere", "calm_pairs"]), flush=True)
            print("steal (ms) per window, run by run: "
                  f"{[r['steal_ms_per_window'] for r in inter]}", flush=True)
            print("CPU seconds per interleaved run, by part:", flush=True)
            print(table([r["cpu_s"] for r in inter], ["web", "operator", "postgres", "redis",
                                                      "scheduler", "bench", "browser"]),
                  flush=True)
            near: dict[str, int] = {}
            for r in inter:
                for page, k in r["slow_near_by_page"].items():
                    near[page] = near.get(page, 0) + k
            print(f"slow webhooks within 50 ms after a page was asked, by page: {near}",
                  flush=True)
            print("intake p99, operator windows / quiet windows: "
                  f"{', '.join(str(r['p99_ratio']) for r in inter)} (median "
                  f"{statistics.median(r['p99_ratio'] for r in inter):.3f}); all runs' webhooks "
                  f"together: {result['interleaved_pooled']}; in the window pairs the host "
                  f"took under {STEAL_CALM_MS} ms from: {result.get('interleaved_calm')}",
                  flush=True)
        if args.replay:
            backlog = sum(r["codes"].get(202, 0) for r in result.get("intake", []))
            backlog += sum(r["codes"].get(202, 0) for r in result.get("interleaved", []))
            rep = replay_stage(sysm, args, backlog)
            result["replay"] = rep
            print(json.dumps(rep, indent=2), flush=True)
    finally:
        keep = RESULTS / "console-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for proc_name, log_path in sysm.logs.items():
            if log_path.exists():
                shutil.copyfile(log_path, keep / f"{proc_name}.log")
        teardown(sysm, args.redis)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    print(f"results: {write_results('console', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
