"""CPU per webhook inside one process: the WSGI app called directly, no HTTP server, no wrk.

The intake benchmark (bench/intake.py) measures what matters, requests per second under
gunicorn, but a run swings by ±10 % on a shared 2-core machine. This one measures the part of
the cost that is ours, steadily enough to compare a change within a few microseconds: the
same signed bodies go through rilla-bridge's app (``create_app``: front door, signature,
parse, store script, log line, metrics) and through the bare baseline app
(bench/baseline_app.py: Flask + one LPUSH), against a real Redis (db 14, flushed), with log
lines written to /dev/null.

    .venv/bin/python -m bench.intake_cpu [--requests 20000] [--redis URL]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from bench.common import DEFAULT_REDIS, BodyFactory
from tests.system import TENANTS

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(raw: bytes, signature: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhooks/callrail/acme",
            "QUERY_STRING": "", "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(raw)), "wsgi.input": io.BytesIO(raw),
            "HTTP_SIGNATURE": signature, "SERVER_NAME": "bench", "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "bench", "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr}


def measure(app: App, bodies: list[tuple[bytes, str]], warmup: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per request after ``warmup`` requests; every answer must be 202."""
    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        if not status.startswith("202"):
            raise SystemExit(f"unexpected answer {status}")

    for raw, sig in bodies[:warmup]:
        b"".join(app(environ(raw, sig), start_response))
    cpu, wall = time.process_time(), time.perf_counter()
    for raw, sig in bodies[warmup:]:
        b"".join(app(environ(raw, sig), start_response))
    n = len(bodies) - warmup
    return 1e6 * (time.process_time() - cpu) / n, 1e6 * (time.perf_counter() - wall) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="Redis URL of a db this benchmark may FLUSH (default db 14)")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=1000)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rb-intake-cpu-"))
    (work / "tenants.toml").write_text(TENANTS)
    os.environ.update({"REDIS_URL": args.redis, "TENANTS_FILE": str(work / "tenants.toml"),
                       "PROMETHEUS_MULTIPROC_DIR": str(work)})
    factory = BodyFactory(uuid.uuid4().hex[:8])
    bodies = [factory.signed(i) for i in range(args.requests + args.warmup)]
    client = redis.Redis.from_url(args.redis)

    from app import create_app  # after the environment above is set
    from bench import baseline_app

    ours = create_app()
    for handler in logging.getLogger().handlers:   # the log line is built, then dropped
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    for label, app in (("baseline (Flask + LPUSH)", baseline_app.app),
                       ("rilla-bridge", ours)):
        client.flushdb()
        cpu, wall = measure(app, bodies, args.warmup)
        print(f"{label:26s} CPU {cpu:6.1f} µs/request   wall {wall:6.1f} µs/request", flush=True)
    client.flushdb()
    print(f"\nrerun: .venv/bin/python -m bench.intake_cpu --requests {args.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
