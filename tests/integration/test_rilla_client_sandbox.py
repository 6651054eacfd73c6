"""The sandbox as a process (``python -m sandbox.rilla``) and the client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests

from rilla_bridge.clients.rilla import RillaClient
from tests.support import free_port, port_open, wait_for

pytestmark = pytest.mark.integration

KEY = "proc-key-0123456789"
REP = "rep@acme.test"
FULL = {
    "event_id": "appt-1", "user_email": REP, "start_time": "2024-06-15 14:00:00",
    "end_time": "2024-06-15 15:00:00", "title": "Estimate - Jane",
    "customer": {"id": "cust-1", "name": "Jane Smith"},
}


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.rilla", "--port", str(port),
         "--org", f"{KEY}={REP}", "--org", "open-org-key-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == f"rilla sandbox listening on http://127.0.0.1:{port}"
        wait_for(lambda: port_open(port), what="rilla sandbox")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert KEY not in err


def control(url: str, method: str, path: str, body: object = None) -> object:
    with requests.Session() as s:
        response = s.request(method, url + path, json=body, timeout=5)
        response.raise_for_status()
        return response.json()


def test_client_against_sandbox_process(sandbox_url: str) -> None:
    control(sandbox_url, "POST", "/_sandbox/reset")
    with RillaClient(sandbox_url, read_timeout=0.3) as client:
        assert client.upsert(KEY, FULL).kind == "ok"
        assert client.upsert(KEY, {"event_id": "appt-1", "user_email": REP}).status == 200
        assert client.upsert(KEY, {"event_id": "new", "user_email": REP}).status == 400
        assert client.upsert("unknown", FULL).status == 422
        assert client.upsert(KEY, {**FULL, "user_email": "x@y.test"}).status == 422
        control(sandbox_url, "POST", "/_sandbox/faults", {"status": 500, "count": 2})
        assert [client.upsert(KEY, FULL).status for _ in range(3)] == [500, 500, 200]
        control(sandbox_url, "POST", "/_sandbox/latency", {"latency_ms": 800, "api_key": KEY})
        slow = client.upsert(KEY, FULL)
        assert slow.kind == "retryable" and slow.error and "read timeout" in slow.error
        control(sandbox_url, "POST", "/_sandbox/latency", {"latency_ms": 0, "api_key": KEY})
        assert client.delete(KEY, "appt-1").status == 200
        assert client.delete(KEY, "appt-1").kind == "ok"
    stats = control(sandbox_url, "GET", "/_sandbox/stats")
    assert isinstance(stats, dict) and stats["deletes"] == 1
    log = control(sandbox_url, "GET", "/_sandbox/requests?limit=1000")
    assert KEY not in str(log) and KEY not in str(control(sandbox_url, "GET",
                                                          "/_sandbox/appointments"))
