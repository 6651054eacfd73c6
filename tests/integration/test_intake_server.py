"""Intake under the real web process (``rilla-bridge web``), against a Redis server the test
controls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rilla_bridge.clock import SystemClock
from rilla_bridge.events import EventStore
from rilla_bridge.lifecycle import make_lifecycle
from rilla_bridge.providers.callrail import signature as callrail_signature
from rilla_bridge.redis_conn import make_redis, single_connection
from rilla_bridge.settings import Settings
from tests.support import RedisServer, wait_for
from tests.system import ADMIN_HEADERS, BIN, System

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ACME_KEY = "acme-signing-key-0001"
SECRETS = ("acme-signing-key-0001", "acme-callingly-token-01", "acme-rilla-key-000001",
           "acme-callrail-api-key-01", "beta-signing-key-0002", "beta-callingly-token-02")


@pytest.fixture
def metrics_dir() -> str:
    return tempfile.mkdtemp(prefix="rb-metrics-")


@pytest.fixture
def web(own_redis: RedisServer, metrics_dir: str) -> Iterator[System]:
    system = System(own_redis.url, env_extra={"PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    try:
        system.start_web(workers=3)
        yield system
    finally:
        system.stop()


def _raw_request(port: int, head: bytes, extra: bytes = b"", timeout: float = 5.0
                 ) -> tuple[bytes, float]:
    """Send ``head`` (+ ``extra``) on a raw socket; the response bytes and seconds taken."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + extra)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and time.monotonic() - started > 0.5:
                break
    return b"".join(chunks), time.monotonic() - started


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]
    return int(response.split(b" ", 2)[1])


def _signed(body: bytes, key: str = ACME_KEY) -> dict[str, str]:
    return {"Signature": callrail_signature(key, body)}


# -- server limits --------------------------------------------------------------------------
def test_huge_headers_are_refused_with_4xx(web: System) -> None:
    body = b'{"resource_id": "CAL1"}'
    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=body,
                         headers={**_signed(body), "X-Big": "a" * 20_000}, timeout=10)
    assert 400 <= resp.status_code < 500
    resp.close()
    many = {f"X-H{i}": "v" for i in range(150)}
    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=body,
                         headers={**_signed(body), **many}, timeout=10)
    assert 400 <= resp.status_code < 500
    resp.close()
    resp = requests.post(f"{web.web}/webhooks/callrail/acme?x={'y' * 20_000}", data=body,
                         headers=_signed(body), timeout=10)
    assert 400 <= resp.status_code < 500
    resp.close()
    # the server is still fine afterwards
    assert requests.get(f"{web.web}/healthz", timeout=5).status_code == 200
    text = web.log("web")
    for secret in SECRETS:
        assert secret not in text


def test_fifty_megabyte_body_is_refused_quickly_without_reading_it(web: System) -> None:
    for path in (b"/webhooks/callrail/acme", b"/webhooks/callingly/acme?token=bad",
                 b"/webhooks/callrail/nobody"):
        head = (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nSignature: x\r\n"
                b"Content-Length: 52428800\r\n\r\n")
        response, seconds = _raw_request(web.web_port, head, b"{" + b"x" * 4096)
        assert _status(response) == 413, response[:300]
        assert seconds < 3, seconds
        assert b'"error"' in response


def test_chunked_oversized_body_is_refused(web: System) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in total, no Content-Length

    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=chunks(),
                         headers={"Signature": "x"}, timeout=10)
    assert resp.status_code == 413
    resp.close()
    body = json.dumps({"resource_id": "CAL-chunk", "pad": "p" * 300_000}).encode()

    def small_chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 10_000):
            yield body[i:i + 10_000]

    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=small_chunks(),
                         headers=_signed(body), timeout=10)
    assert resp.status_code == 202, resp.text
    resp.close()


# -- metrics across workers -----------------------------------------------------------------
def _webhook_counts(base: str) -> dict[tuple[str, str, str], float]:
    resp = requests.get(f"{base}/metrics", headers=ADMIN_HEADERS, timeout=5)
    assert resp.status_code == 200
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "rilla_bridge_webhooks_total":
                labels = sample.labels
                out[(labels["source"], labels["tenant"], labels["code"])] = sample.value
    return out


def test_metrics_count_every_request_across_workers(web: System, metrics_dir: str) -> None:
    sent = {"accepted": 0, "refused": 0, "unknown": 0}

    def accept(i: int) -> int:
        body = json.dumps({"resource_id": f"CALm{i}"}).encode()
        return requests.post(f"{web.web}/webhooks/callrail/acme", data=body,
                             headers=_signed(body), timeout=10).status_code

    def refuse(_: int) -> int:
        return requests.post(f"{web.web}/webhooks/callingly/beta?token=nope", json={"id": 1},
                             timeout=10).status_code

    def unknown_tenant(_: int) -> int:
        return requests.post(f"{web.web}/webhooks/callrail/nobody", data=b"{}",
                             timeout=10).status_code

    # Concurrent rounds until several workers have counted (each writes its own file): the
    # web answers as soon as one worker is up, and one fast worker can take every request
    # of a short burst while the others are still starting.
    deadline = time.monotonic() + 30
    writers: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        while len(writers) < 2 and time.monotonic() < deadline:
            start = sent["accepted"]
            assert set(pool.map(accept, range(start, start + 15))) == {202}
            assert set(pool.map(refuse, range(6))) == {401}
            assert set(pool.map(unknown_tenant, range(3))) == {404}
            sent["accepted"] += 15
            sent["refused"] += 6
            sent["unknown"] += 3
            writers = [p for p in os.listdir(metrics_dir) if p.startswith("counter_")]
    assert len(writers) >= 2, writers
    accepted, refused, unknown = sent["accepted"], sent["refused"], sent["unknown"]
    # ... and every scrape, whichever worker answers it, adds them all up exactly
    for _ in range(6):
        counts = _webhook_counts(web.web)
        assert counts.get(("callrail", "acme", "202")) == accepted
        assert counts.get(("callingly", "beta", "401")) == refused
        assert counts.get(("callrail", "unknown", "404")) == unknown
    text = requests.get(f"{web.web}/metrics", headers=ADMIN_HEADERS, timeout=5).text
    assert "rilla_bridge_queue_depth" in text and 'queue="events"' in text
    for secret in SECRETS:
        assert secret not in text


# -- Redis outage and recovery --------------------------------------------------------------
def test_redis_outage_is_503_then_recovers_without_restart(web: System,
                                                           own_redis: RedisServer) -> None:
    assert requests.get(f"{web.web}/readyz", timeout=5).status_code == 200
    before = json.dumps({"resource_id": "CAL-before"}).encode()
    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=before,
                         headers=_signed(before), timeout=10)
    assert resp.status_code == 202
    kept_id = resp.json()["id"]

    own_redis.stop()
    body = json.dumps({"resource_id": "CAL-outage"}).encode()
    for _ in range(6):  # every worker answers 503, none hangs or says 500
        started = time.monotonic()
        resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=body,
                             headers=_signed(body), timeout=15)
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) > 0
        assert resp.json()["error"]
        assert time.monotonic() - started < 8
    resp = requests.get(f"{web.web}/readyz", timeout=15)
    assert resp.status_code == 503 and "Retry-After" in resp.headers
    assert requests.get(f"{web.web}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{web.web}/metrics", headers=ADMIN_HEADERS, timeout=15).status_code == 200

    own_redis.start()
    wait_for(lambda: requests.get(f"{web.web}/readyz", timeout=5).status_code == 200,
             timeout=20, what="readyz after Redis is back")
    resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=body,
                         headers=_signed(body), timeout=10)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    for i in range(9):  # all workers are healthy again, not only one
        b = json.dumps({"resource_id": f"CAL-after-{i}"}).encode()
        resp = requests.post(f"{web.web}/webhooks/callrail/acme", data=b, headers=_signed(b),
                             timeout=10)
        assert resp.status_code == 202, resp.text
    # the event accepted before the outage survived it (append-only Redis; no worker runs)
    kept = EventStore(make_redis(Settings(redis_url=own_redis.url))).get(kept_id)
    assert kept is not None and kept["status"] == "queued"


def test_web_started_while_redis_is_down_answers_503_then_202(own_redis: RedisServer,
                                                              metrics_dir: str) -> None:
    """Webhooks use a connection per worker, built on first use: a web process that boots
    during a Redis outage must answer 503 and recover by itself, not crash or hang."""
    own_redis.stop()
    system = System(own_redis.url, env_extra={"PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    try:
        system.start_web(workers=2)
        body = json.dumps({"resource_id": "CAL-boot"}).encode()
        for _ in range(4):
            resp = requests.post(f"{system.web}/webhooks/callrail/acme", data=body,
                                 headers=_signed(body), timeout=15)
            assert resp.status_code == 503, resp.text
        own_redis.start()
        wait_for(lambda: requests.get(f"{system.web}/readyz", timeout=5).status_code == 200,
                 timeout=20, what="readyz after Redis is back")
        for i in range(6):   # every worker builds its connection once Redis answers
            b = json.dumps({"resource_id": f"CAL-boot-{i}"}).encode()
            resp = requests.post(f"{system.web}/webhooks/callrail/acme", data=b,
                                 headers=_signed(b), timeout=10)
            assert resp.status_code == 202, resp.text
    finally:
        system.stop()


# -- end to end with a real worker -----------------------------------------------------------
def test_signed_webhook_is_delivered_end_to_end(own_redis: RedisServer) -> None:
    system = System(own_redis.url)
    try:
        system.start_rilla_sandbox(wait=False)
        system.start_worker(wait=False)
        system.start_web(wait=False)
        system.start_history(wait=False)
        system.ready()
        raw = (FIXTURES / "callrail" / "post_call.json").read_bytes()
        resp = system.post_callrail("acme", raw, event="post_call")
        assert resp.status_code == 202, resp.text
        event_id = resp.json()["id"]

        def show() -> dict[str, object]:
            out = subprocess.run(
                [str(BIN / "rilla-bridge"), "events", "show", event_id, "--json"],
                env=system.env(), capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            shown: dict[str, object] = json.loads(out.stdout)
            return shown

        # Polled in history (the command line takes half a second a run), then shown once.
        try:
            wait_for(lambda: system.history.status(event_id) == "delivered",
                     timeout=60, what="event delivered")
            assert show()["event"]["status"] == "delivered"  # type: ignore[index]
        except TimeoutError:
            pytest.fail(f"not delivered: {show()}\n--- worker log ---\n"
                        f"{system.log('worker')[-4000:]}")
        shown = show()
        event = shown["event"]
        assert isinstance(event, dict)
        assert event["id"] == event_id
        assert (event["tenant"], event["source"], event["kind"]) == ("acme", "callrail",
                                                                      "post_call")
        assert "body" not in event
        assert shown["timeline"]
        text = json.dumps(shown)
        for secret in SECRETS:
            assert secret not in text
        # Rilla got the appointment
        call_id = json.loads(raw)["resource_id"]
        state = system.sandbox("appointments")
        assert f"callrail-{call_id}" in json.dumps(state)
    finally:
        system.stop()


def test_store_on_a_single_connection_survives_a_redis_restart(own_redis: RedisServer) -> None:
    """The web stores webhooks on one connection per worker, which redis-py 8 neither checks
    before use nor retries: the first store after a Redis restart must still succeed."""
    settings = Settings(redis_url=own_redis.url)
    client = make_redis(settings)
    lifecycle = make_lifecycle(client, SystemClock(), settings, {},
                               intake_client=single_connection(settings))
    store = EventStore(client)
    try:
        first = lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                             body=b'{"resource_id": "CAL1"}', call_id="CAL1")
        own_redis.stop()
        own_redis.start()
        second = lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                              body=b'{"resource_id": "CAL2"}', call_id="CAL2")
        assert not second.duplicate
        assert store.get(second.event_id) is not None
        assert store.get(first.event_id) is not None   # append-only Redis kept it
    finally:
        client.close()
