"""``rilla-bridge run``: the whole system on one machine, for a new user or a demo.

Everything of one run lives under ``.local/run-<PORT>/`` (PORT: the web port, 8000 unless set),
so runs on different ports share nothing:

1. Redis: REDIS_URL when you set it (keys stay there after the run); otherwise a
   ``redis-server`` of the run's own on a free port, append-only files in
   ``.local/run-<PORT>/redis`` (or, without redis-server on PATH, an in-process
   Redis-compatible server, fakeredis, memory only). It never writes into some other Redis
   that happens to answer on 6379.
2. Writes a demo tenant (``tenants.toml``) unless TENANTS_FILE or TENANTS_TOML is set, and
   ``env``: every variable the run's processes get (REDIS_URL, DATABASE_URL, TENANTS_FILE, the
   demo secrets, ...), so ``. .local/run-8000/env`` makes ``rilla-bridge`` commands in another
   shell talk to this run.
3. Runs the Procfile's ``release`` step (the history schema; DATABASE_URL unset: the SQLite
   file ``.local/run-<PORT>/history.db``), then starts the Rilla and CallRail sandboxes (ports
   PORT+89 and PORT+90) and every other Procfile process, prefixing their output.
4. Sends a signed sample CallRail call and a sample Callingly call, and shows them arriving.
5. On exit stops everything and says what it keeps (the run directory: the next run on that
   port continues from it).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import redis

from rilla_bridge.settings import Settings, mask_url

HERE = Path.cwd()
LOCAL = HERE / ".local"
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunPlan:
    """Where one local run keeps everything, from the web port and the environment."""

    port: int
    home: Path
    env: dict[str, str]          # what every process of the run gets
    own_redis: bool              # True: the run starts its own Redis at env["REDIS_URL"]
    demo: bool                   # True: the demo tenant (and its sample calls)

    @property
    def rilla_port(self) -> int:
        return self.port + 89

    @property
    def callrail_port(self) -> int:
        return self.port + 90

    @property
    def env_file(self) -> Path:
        return self.home / "env"


def plan(environ: Mapping[str, str], local: Path, redis_port: int | None = None) -> RunPlan:
    """The run's directory, ports and environment (writes nothing)."""
    port = int(environ.get("PORT", "").strip() or Settings.port)
    home = local / f"run-{port}"
    env = dict(environ)
    own_redis = not environ.get("REDIS_URL", "").strip()
    if own_redis:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port or free_port()}/0"
    env.setdefault("DATABASE_URL", f"sqlite:///{home / 'history.db'}")
    demo = not (environ.get("TENANTS_FILE", "").strip() or environ.get("TENANTS_TOML", ""))
    if demo:
        env["TENANTS_FILE"] = str(home / "tenants.toml")
        for k, v in DEMO_ENV.items():
            env.setdefault(k, v)
    env["PORT"] = str(port)
    env.setdefault("RILLA_BASE_URL", f"http://127.0.0.1:{port + 89}")
    env.setdefault("CALLRAIL_BASE_URL", f"http://127.0.0.1:{port + 90}")
    env.setdefault("WEB_CONCURRENCY", "2")
    env.setdefault("WORKER_CONCURRENCY", "20")
    env.setdefault("RETRY_BASE_SECONDS", "2")
    return RunPlan(port, home, env, own_redis, demo)


SHARED_NAMES = ("REDIS_URL", "DATABASE_URL", "TENANTS_FILE", "RILLA_BASE_URL",
                "CALLRAIL_BASE_URL", "PORT", "ADMIN_TOKEN", *DEMO_ENV)


def admin_token(p: RunPlan) -> str:
    """The run's ``ADMIN_TOKEN`` (the console's sign-in): the one set in the environment,
    else this run directory's own, made once and kept (0600) so a browser's session survives
    a restart of the run."""
    if p.env.get("ADMIN_TOKEN", "").strip():
        return p.env["ADMIN_TOKEN"]
    path = p.home / "admin-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def write_files(p: RunPlan) -> None:
    """The demo tenants file, the run's admin token, and ``env`` (``. .local/run-PORT/env``
    in another shell)."""
    p.home.mkdir(parents=True, exist_ok=True)
    p.env["ADMIN_TOKEN"] = admin_token(p)
    if p.demo:
        Path(p.env["TENANTS_FILE"]).write_text(DEMO_TENANTS)
    lines = [f"# written by ./dev run (port {p.port}); in a shell: . {p.env_file}"]
    lines += [f"export {name}={shlex.quote(p.env[name])}" for name in SHARED_NAMES
              if p.env.get(name)]
    p.env_file.write_text("\n".join(lines) + "\n")


def start_redis(url: str, data: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """The run's own Redis at ``url`` (a local port); returns it and what it is."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    binary = shutil.which("redis-server")
    proc: subprocess.Popen[bytes] | None = None
    if binary:
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
        what = f"redis-server on port {port} (append-only files in {data})"
    else:
        from fakeredis import TcpFakeServer

        server = TcpFakeServer((host, port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        what = (f"an in-process fakeredis on port {port} (no redis-server on PATH: memory "
                "only; install redis-server for persistence)")
    for _ in range(100):
        if _answers(url):
            return proc, what
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
    p = plan(os.environ, LOCAL)
    write_files(p)
    env = p.env
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    _say(f"this run keeps everything in {p.home}; in another shell: . {p.env_file}")
    redis_proc = None
    if p.own_redis:
        redis_proc, what = start_redis(env["REDIS_URL"], p.home / "redis")
        _say(f"started the run's own Redis: {what}")
    elif _answers(env["REDIS_URL"]):
        _say(f"using the Redis at {mask_url(env['REDIS_URL'])} (REDIS_URL); its keys stay "
             "there after the run")
    else:
        raise SystemExit(f"no Redis answers at {mask_url(env['REDIS_URL'])} (REDIS_URL): start "
                         "it, or unset REDIS_URL and the run starts its own")
    processes = procfile_commands(HERE / "Procfile")
    procs: list[subprocess.Popen[bytes]] = []
    commands: list[tuple[str, str]] = []
    stop = threading.Event()
    try:
        for name, cmd in processes:
            if name == "release":   # as Heroku does: to completion, before the others start
                _say(f"release: {cmd}")
                if subprocess.run(["/bin/sh", "-c", cmd], env=env, check=False).returncode:
                    raise SystemExit("the release step failed; nothing started")
        exe = shlex.quote(sys.executable)
        commands = [
            ("rilla-sbx", f"{exe} -m sandbox.rilla --port {p.rilla_port} "
                          f"--org {env.get('DEMO_RILLA_KEY', 'demo-rilla-key-0001')}"),
            ("callrail-sbx", f"{exe} -m sandbox.callrail --port {p.callrail_port} "
                             f"--account {DEMO_CALLRAIL_ACCOUNT}:"
                             f"{env.get('DEMO_CALLRAIL_API_KEY', 'demo-callrail-api-key-0001')}"),
            *((name, cmd) for name, cmd in processes if name != "release"),
        ]
        procs = [start(n, c, env, COLORS[i % len(COLORS)])
                 for i, (n, c) in enumerate(commands)]
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        base = f"http://127.0.0.1:{p.port}"
        if p.demo:
            from ops.demo import send_samples

            send_samples(base, f"http://127.0.0.1:{p.rilla_port}", env, say=_say)
        _say(f"running; webhooks at {base}/webhooks/callrail/<tenant> and "
             f"{base}/webhooks/callingly/<tenant>?token=...  (Ctrl-C stops everything)")
        _say(f"on-call console: {base}/console/ (sign in with ADMIN_TOKEN from {p.env_file})")
        while not stop.is_set():
            if any(proc.poll() is not None for proc in procs):
                dead = [n for (n, _), proc in zip(commands, procs, strict=True)
                        if proc.poll() is not None]
                _say(f"process exited: {', '.join(dead)}; stopping")
                break
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping ...")
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(timeout=15)
        _say(f"stopped. Kept {p.home} (Redis append-only files, the history database, the "
             f"tenants and env files): the next run on port {p.port} continues from it; "
             f"`rm -rf {p.home}` forgets it."
             + ("" if p.own_redis else f" Keys stay in the Redis at "
                                       f"{mask_url(env['REDIS_URL'])}."))
