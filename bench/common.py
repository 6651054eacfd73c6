"""Helpers shared by the benchmarks: bodies, Redis, results files, tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from rilla_bridge.providers.callrail import signature as callrail_signature

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIXTURE = ROOT / "tests" / "fixtures" / "callrail" / "post_call.json"
ACME_SIGNING_KEY = "acme-signing-key-0001"   # tests/system.py TENANTS
ACME_RILLA_KEY = "acme-rilla-key-000001"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
# A benchmark's one tenant posts far above a production tenant's intake limit (200/s): lift
# it, or most of the load would be answered 429 without being stored.
NO_INTAKE_LIMIT = {"TENANT_INTAKE_PER_SECOND": "1000000", "TENANT_INTAKE_MIB_PER_MINUTE": "1000000"}


def rerun_command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m",
                                             f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        raise SystemExit("refusing to flush Redis db 0: pass a --redis URL with a bench db")
    client.flushdb()


def post_call_body(i: int, run: str) -> bytes:
    """A real-shaped CallRail post-call body, unique per ``i`` (own resource_id and call)."""
    body = json.loads(FIXTURE.read_text())
    rid = f"CAL{run}{i:010d}"
    body["resource_id"] = rid
    if "id" in body:
        body["id"] = rid
    return json.dumps(body, separators=(",", ":")).encode()


class BodyFactory:
    """Fast unique bodies: the fixture serialised once, resource_id substituted per call."""

    def __init__(self, run: str) -> None:
        self.run = run
        marker = "CALMARKERMARKERMARKER"
        body = json.loads(FIXTURE.read_text())
        body["resource_id"] = marker
        if "id" in body:
            body["id"] = marker
        self.template = json.dumps(body, separators=(",", ":"))
        self.marker = marker

    def rid(self, i: int) -> str:
        return f"CAL{self.run}{i:010d}"

    def body(self, i: int) -> bytes:
        return self.template.replace(self.marker, self.rid(i)).encode()

    def signed(self, i: int) -> tuple[bytes, str]:
        raw = self.body(i)
        return raw, callrail_signature(ACME_SIGNING_KEY, raw)


def cpu_seconds(procs: dict[str, Any], redis_url: str) -> dict[str, float]:
    """User+system CPU seconds so far of each named process (with its children) and of the
    Redis server: take one reading before and one after a run and subtract."""
    import psutil

    out: dict[str, float] = {}
    pids = {name: p.pid for name, p in procs.items()}
    pids["redis"] = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
        out[name] = total
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
              for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


def teardown(sysm: Any, redis_url: str) -> None:
    """Stop a benchmark's processes, remove their work dir and flush its Redis db."""
    import shutil

    sysm.stop()
    shutil.rmtree(sysm.workdir, ignore_errors=True)
    flush(redis_url)


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def throwaway_postgres(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database (``rb_bench_<random>``), dropped after."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"rb_bench_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
