"""SPEC: ``rediss://`` (TLS, as on Heroku) must work, for intake and for the Celery workers."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rilla_bridge.clock import SystemClock
from rilla_bridge.lifecycle import make_lifecycle
from rilla_bridge.redis_conn import make_redis
from rilla_bridge.settings import Settings
from tests.support import free_port, wait_for
from tests.system import System

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis_url() -> Iterator[str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    d = Path(tempfile.mkdtemp(prefix="rb-tls-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "k.pem"), "-out", str(d / "c.pem"), "-days", "1", "-subj",
                    "/CN=localhost"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file",
         str(d / "c.pem"), "--tls-key-file", str(d / "k.pem"), "--tls-ca-cert-file",
         str(d / "c.pem"), "--tls-auth-clients", "no", "--save", "", "--dir", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0"
    settings = Settings(redis_url=url, redis_tls_cert_reqs="none")
    wait_for(lambda: bool(make_redis(settings).ping()), what="TLS redis-server")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_plain_redis_client_refuses_a_self_signed_certificate_by_default(
        tls_redis_url: str) -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        make_redis(Settings(redis_url=tls_redis_url)).ping()


def test_intake_and_workers_over_rediss(tls_redis_url: str) -> None:
    settings = Settings(redis_url=tls_redis_url, redis_tls_cert_reqs="none")
    client = make_redis(settings)
    lifecycle = make_lifecycle(client, SystemClock(), settings, {})
    assert not lifecycle.receive(source="callrail", tenant="t", kind="post_call", body=b"{}",
                            call_id=None).duplicate

    system = System(tls_redis_url, env_extra={"REDIS_TLS_CERT_REQS": "none"})
    try:
        system.start_rilla_sandbox(wait=False)
        system.start_web(wait=False)
        system.start_worker(wait=False)
        system.ready()
        body = {"resource_id": "CALtls1", "start_time": "2025-03-11T09:42:17.811-05:00",
                "duration": "60", "customer_name": "Jo Park",
                "customer_phone_number": "+15125550187", "agent_email": "mike@acme.example",
                "recording": "https://app.callrail.com/calls/CALtls1/recording/redirect?a=1"}
        resp = system.post_callrail("acme", body, event="post_call")
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not system.sandbox("appointments"):
            time.sleep(0.05)
        (appt,) = system.sandbox("appointments")
        assert appt["event_id"] == "callrail-CALtls1"
    finally:
        system.stop()
