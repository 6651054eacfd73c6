"""Slow and hostile clients (issue 14): do normal webhooks still get their 202, and how fast?

For each web server named (default: ``granian:2``, the Procfile's ``rilla-bridge web`` with 2
workers, and ``gunicorn:4``, the same app under 4 gunicorn sync workers as before issue 14)
the run starts rilla-bridge's web on loopback and opens

* ``--header-clients`` connections (default 200) that send a request line and then one more
  header byte every ``--interval`` seconds, never finishing their headers, and
* ``--body-clients`` connections (default 200) that send a signed request's headers with
  ``Content-Length: 100000`` and then one body byte every ``--interval`` seconds.

A trickler whose connection the server closes (a read deadline) opens a new one at once, so
the pressure stays on. Meanwhile a normal client posts ``--posts`` signed CallRail webhooks
(default 200, at ``--rate`` per second, each on a new connection, 5 s timeout). The run prints
each server's reply codes, p50/p99/max latency of the normal posts, and how many tricklers
were connected while they were sent. Everything targets 127.0.0.1 and stops by itself
(about 20 s per server). Redis db 14 is flushed before and after.

    .venv/bin/python -m bench.slow_clients
    .venv/bin/python -m bench.slow_clients --servers granian:2 granian:4 gunicorn:4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    DEFAULT_REDIS,
    BodyFactory,
    flush,
    machine,
    rerun_command,
    table,
    teardown,
    write_results,
)
from tests.system import System

HOST = "127.0.0.1"
PATH = "/webhooks/callrail/acme"
POST_TIMEOUT = 5.0


@dataclass
class Pressure:
    """The tricklers' shared state: how many are connected, how often the server hung up."""

    open_headers: int = 0
    open_bodies: int = 0
    server_closed: int = 0
    connect_errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def _trickle(port: int, kind: str, interval: float, p: Pressure) -> None:
    """One slow client, reconnecting whenever the server hangs up, until ``p.stop``."""
    if kind == "headers":
        head = f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
    else:
        head = (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\nSignature: c2xvdw==\r\n"
                f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{").encode()
    while not p.stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            p.connect_errors += 1
            await asyncio.sleep(interval)
            continue
        counted = False
        try:
            writer.write(head)
            await writer.drain()
            counted = True
            if kind == "headers":
                p.open_headers += 1
            else:
                p.open_bodies += 1
            while not p.stop.is_set():
                try:   # a reply or EOF means the server gave up on us: reconnect
                    data = await asyncio.wait_for(reader.read(4096), interval)
                except TimeoutError:
                    writer.write(b"a")
                    await writer.drain()
                    continue
                if data or reader.at_eof():
                    p.server_closed += 1
                    break
        except OSError:
            p.server_closed += 1
        finally:
            if counted:
                if kind == "headers":
                    p.open_headers -= 1
                else:
                    p.open_bodies -= 1
            writer.close()


async def _post(port: int, raw: bytes, sig: str) -> tuple[str, float]:
    """One normal signed webhook on a new connection: its status code (or what went wrong)
    and the seconds from connect to the whole reply."""
    started = time.perf_counter()
    request = (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\nSignature: {sig}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
               f"Connection: close\r\n\r\n").encode() + raw

    async def exchange() -> str:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            await reader.read()   # the rest of the reply, to the server's close
            return status.split(b" ", 2)[1].decode() if status else "closed"
        finally:
            writer.close()

    try:
        code = await asyncio.wait_for(exchange(), POST_TIMEOUT)
    except TimeoutError:
        code = "timeout"
    except OSError as exc:
        code = type(exc).__name__
    return code, time.perf_counter() - started


async def _run(port: int, args: argparse.Namespace) -> dict[str, Any]:
    p = Pressure()
    tricklers = [asyncio.create_task(_trickle(port, kind, args.interval, p))
                 for kind, n in (("headers", args.header_clients), ("bodies", args.body_clients))
                 for _ in range(n)]
    deadline = time.monotonic() + 5
    while (p.open_headers + p.open_bodies < args.header_clients + args.body_clients
           and time.monotonic() < deadline):
        await asyncio.sleep(0.05)
    await asyncio.sleep(args.interval * 2)   # the servers are now reading trickled requests
    factory = BodyFactory(uuid.uuid4().hex[:8])
    posts: list[asyncio.Task[tuple[str, float]]] = []
    seen_open: list[tuple[int, int]] = []
    for i in range(args.posts):
        raw, sig = factory.signed(i)
        seen_open.append((p.open_headers, p.open_bodies))
        posts.append(asyncio.create_task(_post(port, raw, sig)))
        await asyncio.sleep(1 / args.rate)
    results = await asyncio.gather(*posts)
    p.stop.set()
    await asyncio.gather(*tricklers, return_exceptions=True)
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    ms = sorted(1000 * s for code, s in results if code == "202")
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {
        "posts": len(results), "codes": codes, "answered_202": len(ms),
        "p50_ms": round(q[49], 1) if ms else None, "p99_ms": round(q[98], 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None,
        "open_headers_min": min(h for h, _ in seen_open),
        "open_bodies_min": min(b for _, b in seen_open),
        "open_mean": round(statistics.fmean(h + b for h, b in seen_open)),
        "server_closed": p.server_closed, "connect_errors": p.connect_errors,
    }


def run_server(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    server, _, workers = spec.partition(":")
    flush(args.redis)
    sysm = System(redis_url=args.redis)
    try:
        sysm.start_web(workers=int(workers or 2), server=server)
        result = asyncio.run(_run(sysm.web_port, args))
    finally:
        teardown(sysm, args.redis)
    return {"server": spec, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="Redis URL of a db this benchmark may FLUSH (default db 14)")
    p.add_argument("--servers", nargs="+", default=["granian:2", "gunicorn:4"],
                   help="granian:W (rilla-bridge web) or gunicorn:W (sync workers)")
    p.add_argument("--header-clients", type=int, default=200)
    p.add_argument("--body-clients", type=int, default=200)
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between two bytes of a trickler")
    p.add_argument("--posts", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="normal posts per second")
    args = p.parse_args(argv)
    if args.posts < 1 or args.rate <= 0:
        p.error("--posts and --rate must be positive")
    rows = []
    for spec in args.servers:
        row = run_server(spec, args)
        rows.append(row)
        print(f"{spec}: {row}", flush=True)
    cols = ["server", "posts", "codes", "p50_ms", "p99_ms", "max_ms", "open_mean",
            "open_headers_min", "open_bodies_min", "server_closed"]
    print()
    print(f"normal signed webhooks while {args.header_clients} connections trickle headers and "
          f"{args.body_clients} trickle bodies ({args.interval:g} s a byte); "
          f"target: all 202, p99 < 100 ms")
    print(table([{c: str(r[c]) for c in cols} for r in rows], cols))
    path = write_results("slow_clients", {"machine": machine(), "command": rerun_command(),
                                          "args": vars(args), "rows": rows})
    print(f"\nresults: {path}\nrerun:   {rerun_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
