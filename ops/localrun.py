"""``rilla-bridge run``: the whole system on one machine, for a new user or a demo.

1. Redis: uses REDIS_URL when it answers; otherwise starts ``redis-server`` from PATH (with
   append-only persistence under .local/redis), or, when there is none, an in-process
   Redis-compatible server (fakeredis, from the dev extras) on the same port.
2. Writes a demo tenant (.local/tenants.toml) unless TENANTS_FILE points elsewhere.
3. Runs the Procfile's ``release`` step (the history schema; with DATABASE_URL unset, a
   SQLite file in the working directory), then starts the Rilla and CallRail sandboxes and
   every other Procfile process, prefixing their output.
4. Sends a signed sample CallRail call and a sample Callingly call, and shows them arriving.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import redis

from rilla_bridge.settings import Settings

HERE = Path.cwd()
LOCAL = HERE / ".local"
RILLA_PORT, CALLRAIL_PORT = 8089, 8090
DEMO_ENV = {
    "DEMO_RILLA_KEY": "demo-rilla-key-0001",
    "DEMO_CALLRAIL_SIGNING_KEY": "072e77e426f92738a72fe23c4d1953b4",
    "DEMO_CALLINGLY_TOKEN": "demo-callingly-token-0001",
    "DEMO_CALLRAIL_API_KEY": "demo-callrail-api-key-0001",
}
DEMO_CALLRAIL_ACCOUNT = "227799611"   # known to the local CallRail sandbox from its start
DEMO_TENANTS = """\
[tenants.demo]
rilla_api_key = "${DEMO_RILLA_KEY}"
default_user_email = "office@demo-roofing.example"
[tenants.demo.users]
"mike@acme.example" = "mike.r@demo-roofing.example"
[tenants.demo.callrail]
signing_key = "${DEMO_CALLRAIL_SIGNING_KEY}"
account_id = "@ACCOUNT@"
api_key = "${DEMO_CALLRAIL_API_KEY}"
[tenants.demo.callingly]
webhook_token = "${DEMO_CALLINGLY_TOKEN}"
""".replace("@ACCOUNT@", DEMO_CALLRAIL_ACCOUNT)
COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m", "\033[37m"]


def _say(msg: str) -> None:
    print(f"\033[1mrilla-bridge run |\033[0m {msg}", flush=True)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def ensure_redis(url: str) -> tuple[subprocess.Popen[bytes] | None, Any]:
    if _answers(url):
        _say(f"using the Redis at {url}")
        return None, None
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"no Redis answers at {url}, and it is not local: start it first")
    binary = shutil.which("redis-server")
    if binary:
        data = LOCAL / "redis"
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
        _say(f"started redis-server on port {port} (append-only files in {data})")
    else:
        from fakeredis import TcpFakeServer

        server = TcpFakeServer((host, port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _say(f"no redis-server on PATH: started an in-process fakeredis on port {port} "
             "(memory only; install redis-server for persistence)")
        proc = None
    for _ in range(100):
        if _answers(url):
            return proc, None
        time.sleep(0.1)
    raise SystemExit("the local Redis did not come up")


def _pump(name: str, color: str, stream: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace").rstrip()
        print(f"{color}{name:<10}|\033[0m {text}", flush=True)


def procfile_commands(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            name, cmd = line.split(":", 1)
            out.append((name.strip(), cmd.strip()))
    return out


def start(name: str, cmd: str, env: dict[str, str], color: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["/bin/sh", "-c", f"exec {cmd}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(name, color, proc.stdout), daemon=True).start()
    return proc


def run_local() -> None:
    settings = Settings.from_env()
    env = dict(os.environ)
    LOCAL.mkdir(exist_ok=True)
    if "TENANTS_FILE" not in os.environ:
        (LOCAL / "tenants.toml").write_text(DEMO_TENANTS)
        env["TENANTS_FILE"] = str(LOCAL / "tenants.toml")
        for k, v in DEMO_ENV.items():
            env.setdefault(k, v)
    env.setdefault("RILLA_BASE_URL", f"http://127.0.0.1:{RILLA_PORT}")
    env.setdefault("CALLRAIL_BASE_URL", f"http://127.0.0.1:{CALLRAIL_PORT}")
    env.setdefault("PORT", str(settings.port))
    env.setdefault("WEB_CONCURRENCY", "2")
    env.setdefault("WORKER_CONCURRENCY", "20")
    env.setdefault("RETRY_BASE_SECONDS", "2")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    processes = procfile_commands(HERE / "Procfile")
    for name, cmd in processes:
        if name == "release":   # as Heroku does: to completion, before the others start
            _say(f"release: {cmd}")
            if subprocess.run(["/bin/sh", "-c", cmd], env=env, check=False).returncode:
                raise SystemExit("the release step failed; nothing started")
    redis_proc, _ = ensure_redis(settings.redis_url)

    exe = shlex.quote(sys.executable)
    commands = [
        ("rilla-sbx", f"{exe} -m sandbox.rilla --port {RILLA_PORT} "
                      f"--org {env.get('DEMO_RILLA_KEY', 'demo-rilla-key-0001')}"),
        ("callrail-sbx", f"{exe} -m sandbox.callrail --port {CALLRAIL_PORT} "
                         f"--account {DEMO_CALLRAIL_ACCOUNT}:"
                         f"{env.get('DEMO_CALLRAIL_API_KEY', 'demo-callrail-api-key-0001')}"),
        *((name, cmd) for name, cmd in processes if name != "release"),
    ]
    procs = [start(n, c, env, COLORS[i % len(COLORS)]) for i, (n, c) in enumerate(commands)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        base = f"http://127.0.0.1:{env['PORT']}"
        if "TENANTS_FILE" not in os.environ:
            from ops.demo import send_samples

            send_samples(base, f"http://127.0.0.1:{RILLA_PORT}", env, say=_say)
        _say(f"running; webhooks at {base}/webhooks/callrail/<tenant> and "
             f"{base}/webhooks/callingly/<tenant>?token=...  (Ctrl-C stops everything)")
        while not stop.is_set():
            if any(p.poll() is not None for p in procs):
                dead = [n for (n, _), p in zip(commands, procs, strict=True)
                        if p.poll() is not None]
                _say(f"process exited: {', '.join(dead)}; stopping")
                break
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping ...")
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(timeout=15)

