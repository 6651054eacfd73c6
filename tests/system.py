"""Start real rilla-bridge processes (sandbox, web, worker, scheduler) for integration tests
and benchmarks. Everything binds to 127.0.0.1 and is stopped by ``System.stop``.

Every ``start_*`` waits until its process is ready; with ``wait=False`` it only spawns it, and
``ready()`` then waits for everything spawned so far, so that processes start side by side."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from rilla_bridge.providers.callrail import signature as callrail_signature
from tests.support import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# ``stop`` gives the sandboxes, the web and the scheduler this long to exit on SIGTERM (they
# take a few hundred milliseconds), then kills what is left. Celery workers are not waited for:
# their warm shutdown takes seconds (so does the cold one, SIGQUIT), and nothing a test checks
# happens after ``stop`` (the test's data goes with it).
STOP_GRACE_SECONDS = 2.0
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

TENANTS = """\
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"
default_user_email = "office@acme.example"
[tenants.acme.users]
"mike@acme.example" = "mike.r@acme.example"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"
account_id = "111111111"
api_key = "acme-callrail-api-key-01"
[tenants.acme.callingly]
webhook_token = "acme-callingly-token-01"

[tenants.beta]
rilla_api_key = "beta-rilla-key-000002"
default_user_email = "office@beta.example"
[tenants.beta.callrail]
signing_key = "beta-signing-key-0002"
[tenants.beta.callingly]
webhook_token = "beta-callingly-token-02"
"""


@dataclass
class System:
    """A running rilla-bridge: ``start(...)`` what a test needs, ``stop()`` at the end."""

    redis_url: str
    tenants: str = TENANTS
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rb-sys-")))
    web_port: int = field(default_factory=free_port)
    rilla_port: int = field(default_factory=free_port)
    callrail_port: int = field(default_factory=free_port)
    starting: dict[str, tuple[Callable[[], bool], float]] = field(default_factory=dict)
    workers: set[str] = field(default_factory=set)   # Celery workers (not waited for by stop)
    database_url: str = ""    # the history database; default: a SQLite file in the work dir
    _history: History | None = None

    def __post_init__(self) -> None:
        self.database_url = self.database_url or f"sqlite:///{self.workdir / 'history.db'}"

    @property
    def history(self) -> History:
        """Reading this system's history database (what the command line and console read)."""
        if self._history is None:
            self._history = History(self.database_url)
        return self._history

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def rilla(self) -> str:
        return f"http://127.0.0.1:{self.rilla_port}"

    @property
    def callrail(self) -> str:
        return f"http://127.0.0.1:{self.callrail_port}"

    def env(self) -> dict[str, str]:
        self._write_tenants()
        env = dict(os.environ)
        env.update({
            "REDIS_URL": self.redis_url,
            "TENANTS_FILE": str(self.workdir / "tenants.toml"),
            "RILLA_BASE_URL": self.rilla,
            "CALLRAIL_BASE_URL": self.callrail,
            "PORT": str(self.web_port),
            "WEB_CONCURRENCY": "2",
            "RETRY_BASE_SECONDS": "0.5",
            "RETRY_MAX_DELAY_SECONDS": "2",
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": self.database_url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": "",
        })
        env.pop("PROMETHEUS_MULTIPROC_DIR")
        env.update(self.env_extra)
        return env

    def _write_tenants(self) -> None:
        """Replace the tenants file atomically, and only when it changed: a process starting
        while the file is being rewritten in place would read it half-written."""
        path = self.workdir / "tenants.toml"
        if path.exists() and path.read_text() == self.tenants:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.tenants)
        os.replace(tmp, path)

    def _spawn(self, name: str, args: list[str], ready: Callable[[], bool] | None = None,
               timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Start ``args`` as ``name`` (its own session, output to its log); ``ready`` tells
        when it is up, for ``ready()``."""
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(args, env=self.env(), cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        if ready is not None:
            self.starting[name] = (ready, timeout)
        return proc

    def _logged(self, name: str, text: bytes) -> Callable[[], bool]:
        return lambda: text in self.logs[name].read_bytes()

    def ready(self) -> None:
        """Wait until every process started with ``wait=False`` is ready; fail at once if one
        exits first (its log's tail in the message)."""
        for name, (check, timeout) in list(self.starting.items()):
            proc = self.procs[name]
            deadline = time.monotonic() + timeout
            while not _true(check):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} before it was "
                                       f"ready; log:\n{self.log(name)[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {name} ready; "
                                       f"log:\n{self.log(name)[-3000:]}")
                time.sleep(0.05)
            del self.starting[name]

    def start_rilla_sandbox(self, *orgs: str, latency_ms: int = 0, wait: bool = True) -> None:
        org_args = [a for o in (orgs or ("acme-rilla-key-000001", "beta-rilla-key-000002"))
                    for a in ("--org", o)]
        self._spawn("rilla", [sys.executable, "-m", "sandbox.rilla", "--port",
                              str(self.rilla_port), "--latency-ms", str(latency_ms), *org_args],
                    lambda: port_open(self.rilla_port), timeout=20)
        if wait:
            self.ready()

    def start_callrail_sandbox(self, *args: str, wait: bool = True) -> None:
        self._spawn("callrail_sbx", [sys.executable, "-m", "sandbox.callrail",
                                     "--port", str(self.callrail_port), *args],
                    lambda: port_open(self.callrail_port), timeout=20)
        if wait:
            self.ready()

    def start_web(self, workers: int = 2, wait: bool = True, server: str = "granian",
                  threads: int = 1) -> None:
        """The web process as the Procfile runs it (``rilla-bridge web``); with
        ``server="gunicorn"``, the same app under gunicorn's sync workers (gthread with
        ``threads`` > 1) instead, as it was served before issue 14: benchmarks and a test
        compare the two."""
        self.env_extra["WEB_CONCURRENCY"] = str(workers)
        if server == "granian":
            args = [str(BIN / "rilla-bridge"), "web", "--host", "127.0.0.1"]
        elif server == "gunicorn":
            self.env_extra.setdefault("PROMETHEUS_MULTIPROC_DIR",
                                      tempfile.mkdtemp(prefix="rb-metrics-"))
            args = [str(BIN / "gunicorn"), "--workers", str(workers), "--timeout", "30",
                    "--worker-class", "sync" if threads == 1 else "gthread",
                    "--threads", str(threads), "--no-control-socket",
                    "--bind", f"127.0.0.1:{self.web_port}", "app.wsgi:app"]
        else:
            raise ValueError(f"unknown web server {server!r}")
        self._spawn("web", args, lambda: requests.get(f"{self.web}/healthz", timeout=1).ok,
                    timeout=20)
        if wait:
            self.ready()

    def start_worker(self, name: str = "worker", queue: str = "events",
                     concurrency: int = 20, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self._spawn(name, [
            str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-Q", queue, "-P",
            "gevent", "-c", str(concurrency), "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "INFO", "-n", f"{name}@%h"],
            self._logged(name, b"ready"))
        self.workers.add(name)
        if wait:
            self.ready()
        return proc

    def start_scheduler(self, name: str = "scheduler", wait: bool = True) -> None:
        self._spawn(name, [str(BIN / "rilla-bridge"), "scheduler"],
                    self._logged(name, b"scheduler started"))
        if wait:
            self.ready()

    def upgrade_db(self) -> None:
        """The history database brought to the current schema (``rilla-bridge db upgrade``)."""
        subprocess.run([str(BIN / "rilla-bridge"), "db", "upgrade"], env=self.env(), cwd=ROOT,
                       check=True, capture_output=True, timeout=120)

    def start_history(self, name: str = "history", wait: bool = True) -> None:
        """The history database brought to the current schema, then the history process."""
        self.upgrade_db()
        self._spawn(name, [str(BIN / "rilla-bridge"), "history"],
                    self._logged(name, b"history started"))
        if wait:
            self.ready()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        self.starting.pop(name, None)
        self.workers.discard(name)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to every process group; once every process but the Celery workers has
        exited (at most ``grace`` seconds), SIGKILL to what is left."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in self.procs.items():
            if name not in self.workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)   # with whatever children it still has
        for proc in self.procs.values():
            proc.wait(timeout=10)
        self.procs.clear()
        self.starting.clear()
        self.workers.clear()
        if self._history is not None:
            self._history.close()
            self._history = None

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    # -- traffic ---------------------------------------------------------------------------
    def post_callrail(self, tenant: str, body: dict[str, Any] | bytes, event: str | None = None,
                      key: str | None = None) -> requests.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        key = key or f"{tenant}-signing-key-000{1 if tenant == 'acme' else 2}"
        url = f"{self.web}/webhooks/callrail/{tenant}" + (f"?event={event}" if event else "")
        return requests.post(url, data=raw, headers={"Signature": callrail_signature(key, raw)},
                             timeout=10)

    def post_callingly(self, tenant: str, body: dict[str, Any]) -> requests.Response:
        token = f"{tenant}-callingly-token-0{1 if tenant == 'acme' else 2}"
        return requests.post(f"{self.web}/webhooks/callingly/{tenant}?token={token}",
                             json=body, timeout=10)

    def sandbox(self, path: str, method: str = "GET", **kw: Any) -> Any:
        r = requests.request(method, f"{self.rilla}/_sandbox/{path}", timeout=10, **kw)
        r.raise_for_status()
        return r.json() if r.content else None


class History:
    """The history database of a running system, read as the operator tools read it."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.pool import NullPool

        from rilla_bridge.history.db import make_engine
        from rilla_bridge.settings import Settings

        self.engine = make_engine(Settings(database_url=url), poolclass=NullPool)

    def close(self) -> None:
        self.engine.dispose()

    def event(self, event_id: str) -> dict[str, Any] | None:
        """``queries.event``: the record, timeline, dead letters and call (None: not there)."""
        from rilla_bridge.history import queries
        from rilla_bridge.history.db import reading

        try:
            with reading(self.engine) as conn:
                return queries.event(conn, event_id)
        except Exception:   # the history process has not created the tables yet
            return None

    def status(self, event_id: str) -> str | None:
        found = self.event(event_id)
        return str(found["event"]["status"]) if found else None

    def timeline(self, event_id: str) -> list[str]:
        found = self.event(event_id)
        return [e["what"] for e in found["timeline"]] if found else []

    def open_dead_letters(self) -> list[dict[str, Any]]:
        """Open dead letters, oldest first (the rows ``dlq list`` shows)."""
        from rilla_bridge.history import queries
        from rilla_bridge.history.db import reading

        try:
            with reading(self.engine) as conn:
                page = queries.dead_letters_page(conn, queries.DeadLetterFilter())
        except Exception:
            return []
        return list(page.rows)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group ``proc`` leads (each process is started in a session of its
    own); a group that is gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _true(check: Callable[[], bool]) -> bool:
    """``check()``, where an exception (the thing is not up yet) counts as False."""
    try:
        return bool(check())
    except Exception:
        return False
