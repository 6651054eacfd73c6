"""Start real rilla-bridge processes (sandbox, web, worker, scheduler) for integration tests
and benchmarks. Everything binds to 127.0.0.1 and is stopped by ``System.stop``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from rilla_bridge.providers.callrail import signature as callrail_signature
from tests.support import free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

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

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(args, env=self.env(), cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_rilla_sandbox(self, *orgs: str, latency_ms: int = 0) -> None:
        org_args = [a for o in (orgs or ("acme-rilla-key-000001", "beta-rilla-key-000002"))
                    for a in ("--org", o)]
        self._spawn("rilla", [sys.executable, "-m", "sandbox.rilla", "--port",
                              str(self.rilla_port), "--latency-ms", str(latency_ms), *org_args])
        wait_for(lambda: port_open(self.rilla_port), what="rilla sandbox")

    def start_callrail_sandbox(self, *args: str) -> None:
        self._spawn("callrail_sbx", [sys.executable, "-m", "sandbox.callrail",
                                     "--port", str(self.callrail_port), *args])
        wait_for(lambda: port_open(self.callrail_port), what="callrail sandbox")

    def start_web(self, workers: int = 2) -> None:
        self.env_extra["WEB_CONCURRENCY"] = str(workers)
        self._spawn("web", [str(BIN / "gunicorn"), "-c", "app/gunicorn_conf.py",
                            "--bind", f"127.0.0.1:{self.web_port}", "app.wsgi:app"])
        wait_for(lambda: requests.get(f"{self.web}/healthz", timeout=1).ok, what="web")

    def start_worker(self, name: str = "worker", queue: str = "events",
                     concurrency: int = 20) -> subprocess.Popen[bytes]:
        proc = self._spawn(name, [
            str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-Q", queue, "-P",
            "gevent", "-c", str(concurrency), "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "INFO", "-n", f"{name}@%h"])
        wait_for(lambda: b"ready" in self.logs[name].read_bytes(), timeout=30,
                 what=f"{name} ready")
        return proc

    def start_scheduler(self, name: str = "scheduler") -> None:
        self._spawn(name, [str(BIN / "rilla-bridge"), "scheduler"])
        wait_for(lambda: b"scheduler started" in self.logs[name].read_bytes(), timeout=30,
                 what="scheduler")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()

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
