"""Sentry from the real processes: errors raised in the web process and in a Celery worker reach
a local endpoint that captures Sentry envelopes (``SENTRY_DSN=http://key@127.0.0.1:<port>/1``),
and no signing key, token, API key, recording ``access_key`` or raw body is inside. Requests to
Rilla and CallRail (served here by the same endpoint) carry no ``sentry-trace`` or ``baggage``
header.

The two errors are made by a ``sitecustomize`` module on the processes' ``PYTHONPATH`` that
wraps, once imported, ``app.intake.Intake.handle`` and ``workers.pipeline._run``: for a body
carrying a marker they raise an exception whose message quotes the tenant's secrets and a
recording URL, holding the raw body in a local variable, and the worker's also logs an ERROR
with the body, the key and the recording URL as ``extra`` fields, as careless code would.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from rilla_bridge.providers.callrail import signature as callrail_signature
from tests.support import RedisServer, until
from tests.system import ADMIN_TOKEN, ROOT, System

pytestmark = pytest.mark.integration

SIGNING_KEY = "acme-signing-key-0001"        # tests/system.py's tenant acme
CALLINGLY_TOKEN = "acme-callingly-token-01"
RILLA_KEY = "acme-rilla-key-000001"
CALLRAIL_API_KEY = "acme-callrail-api-key-01"
ACCOUNT = "111111111"
ACCESS_KEY = "AKsentry0test0access0key0f3a9"
RAW_BODY_MARK = "RAW-BODY-BYTES-Kaylah-Mills-512-555-0187"
WEB_BOOM = "SENTRY-WEB-BOOM"
WORKER_BOOM = "SENTRY-WORKER-BOOM"

SITECUSTOMIZE = f'''
"""Test only (tests/integration/test_sentry_processes.py): break two functions for marked
bodies, once their modules are imported."""
import importlib.abc
import importlib.util
import logging
import sys

ACCESS_URL = "https://app.callrail.com/calls/CAL1/recording/redirect?access_key={ACCESS_KEY}"


def _patch_intake(mod):
    handle = mod.Intake.handle

    def broken(self, req):
        if b"{WEB_BOOM}" in req.body:
            body = req.body   # a local holding the raw body
            tenant = self.tenants[req.tenant]
            raise RuntimeError(
                f"web broke on {{len(body)}} bytes: signing key "
                f"{{tenant.callrail.signing_keys[0]}}, token "
                f"{{tenant.callingly.webhook_tokens[0]}}, recording {{ACCESS_URL}}")
        return handle(self, req)

    mod.Intake.handle = broken


def _patch_pipeline(mod):
    run = mod._run

    def broken(rt, event, worker):
        body = event.get("body") or b""
        if b"{WORKER_BOOM}" in body:
            tenant = rt.tenants[event["tenant"]]
            logging.getLogger("rilla_bridge.worker").error(
                "worker broke", extra={{"body": body.decode(), "api_key": tenant.rilla_api_key,
                                       "recording": ACCESS_URL, "raw": body}})
            raise RuntimeError(
                f"worker broke: rilla key {{tenant.rilla_api_key}}, callrail key "
                f"{{tenant.callrail.api_key}}, recording {{ACCESS_URL}}")
        return run(rt, event, worker)

    mod._run = broken


PATCHES = {{"app.intake": _patch_intake, "workers.pipeline": _patch_pipeline}}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
'''


class Capture:
    """A loopback HTTP server that answers as Sentry's envelope endpoint (keeping the
    envelopes), as Rilla's API (every upsert answered 200) and as CallRail's (a recording.json
    answered with a media URL carrying ``access_key``), keeping the API requests' headers.
    Two run: Sentry's and the APIs' (on the DSN's own host and port, Sentry never adds its
    headers, so the APIs must be elsewhere for the header check to mean anything)."""

    def __init__(self) -> None:
        self.envelopes: list[str] = []
        self.api_requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read(self) -> bytes:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    return gzip.decompress(raw)
                if encoding == "deflate":
                    return zlib.decompress(raw)
                assert encoding in ("", "identity"), encoding
                return raw

            def do_POST(self) -> None:
                body = self._read()
                if self.path.startswith("/api/1/envelope"):
                    with capture.lock:
                        capture.envelopes.append(body.decode("utf-8", "replace"))
                    self._answer(200, {})
                    return
                self._api("POST")

            def do_PUT(self) -> None:
                self._read()
                self._api("PUT")

            def do_GET(self) -> None:
                self._api("GET")

            def _api(self, method: str) -> None:
                with capture.lock:
                    capture.api_requests.append(
                        (method, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path.endswith("/recording.json"):
                    call = self.path.split("/calls/")[1].split("/")[0]
                    self._answer(200, {"url": "https://app.callrail.com/calls/"
                                              f"{call}/recording/redirect?access_key={ACCESS_KEY}"})
                else:
                    self._answer(200, {"message": "Appointment created"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.envelopes)

    def events(self) -> list[dict[str, Any]]:
        """The event items of every envelope (header line, then item header and payload)."""
        out = []
        with self.lock:
            envelopes = list(self.envelopes)
        for envelope in envelopes:
            lines = envelope.split("\n")
            for i in range(1, len(lines) - 1):
                try:
                    header = json.loads(lines[i])
                except ValueError:
                    continue
                if isinstance(header, dict) and header.get("type") == "event":
                    out.append(json.loads(lines[i + 1]))
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    """Sentry's endpoint."""
    c = Capture()
    yield c
    c.stop()


@pytest.fixture
def apis() -> Iterator[Capture]:
    """Rilla's and CallRail's APIs."""
    c = Capture()
    yield c
    c.stop()


@pytest.fixture
def system(own_redis: RedisServer, capture: Capture, apis: Capture,
           tmp_path: Path) -> Iterator[System]:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    s = System(own_redis.url, env_extra={
        "SENTRY_DSN": f"http://publickey@127.0.0.1:{capture.port}/1",
        "ENVIRONMENT": "sentry-test",
        "RILLA_BASE_URL": apis.url,
        "CALLRAIL_BASE_URL": apis.url,
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
    })
    s.rilla_port = s.callrail_port = apis.port
    yield s
    s.stop()


def call_body(call_id: str, mark: str = "", recording_json: bool = False) -> dict[str, Any]:
    recording = (f"https://api.callrail.com/v3/a/{ACCOUNT}/calls/{call_id}/recording.json"
                 if recording_json else
                 f"https://app.callrail.com/calls/{call_id}/recording/redirect"
                 f"?access_key={ACCESS_KEY}")
    return {"resource_id": call_id, "start_time": "2026-11-30T09:42:17.811-05:00",
            "duration": "95", "answered": True, "customer_name": "Jo Park",
            "customer_phone_number": "+15125550100", "agent_email": "mike@acme.example",
            "recording": recording, "note": f"{RAW_BODY_MARK} {mark}".strip()}


def test_web_and_worker_errors_reach_sentry_without_secrets_and_no_trace_headers_leave(
        system: System, capture: Capture, apis: Capture) -> None:
    system.start_web(wait=False)
    system.start_worker(wait=False)
    system.start_worker(name="callrail", queue="callrail", concurrency=4, wait=False)
    system.start_scheduler(wait=False)
    system.ready()

    # The web: an unexpected error answering a CallRail webhook and a Callingly one (its
    # token in the query string).
    web = system.post_callrail("acme", call_body("CALweb0001", WEB_BOOM), event="post_call")
    assert web.status_code == 500 and RAW_BODY_MARK not in web.text
    callingly = requests.post(
        f"{system.web}/webhooks/callingly/acme?token={CALLINGLY_TOKEN}",
        json={"id": 1, "note": f"{RAW_BODY_MARK} {WEB_BOOM}"}, timeout=10)
    assert callingly.status_code == 500

    # A worker: an unexpected error delivering one call; two other calls are delivered, one
    # of them after a CallRail recording lookup.
    broken = system.post_callrail("acme", call_body("CALwrk0001", WORKER_BOOM), "post_call")
    assert broken.status_code == 202, broken.text
    for body in (call_body("CALok00001"), call_body("CALok00002", recording_json=True)):
        assert system.post_callrail("acme", body, "post_call").status_code == 202

    def components() -> set[str]:
        return {str(e.get("tags", {}).get("component")) for e in capture.events()}

    until(lambda: {"web", "worker"} <= components(), 60, "Sentry events from web and worker")
    until(lambda: len([r for r in apis.api_requests if r[0] == "POST"]) >= 2, 60,
          "two deliveries to Rilla")
    until(lambda: any(r[1].endswith("/recording.json") for r in apis.api_requests), 60,
          "a CallRail recording lookup")
    time.sleep(1.0)   # events still in the processes' Sentry queues

    events = capture.events()
    text = capture.text()
    assert "web broke" in text and "worker broke" in text   # the errors themselves arrive
    assert {e.get("environment") for e in events} == {"sentry-test"}
    sig = callrail_signature(SIGNING_KEY, json.dumps(call_body("CALweb0001", WEB_BOOM)).encode())
    for secret in (SIGNING_KEY, CALLINGLY_TOKEN, RILLA_KEY, CALLRAIL_API_KEY, ACCESS_KEY,
                   RAW_BODY_MARK, ADMIN_TOKEN, sig):
        at = text.find(secret)
        assert at < 0, f"{secret!r} reached Sentry: ...{text[max(0, at - 400):at + 60]}..."
    # The web's events carry the request, without its query string or body.
    requests_seen = [e["request"] for e in events if "request" in e]
    assert requests_seen, "the web's events carry no request"
    assert all("?" not in r.get("url", "") and "data" not in r for r in requests_seen)

    assert not capture.api_requests and not apis.envelopes
    api = list(apis.api_requests)
    assert any(m == "POST" for m, _, _ in api) and any(p.endswith("recording.json")
                                                       for _, p, _ in api)
    for method, path, headers in api:
        assert "sentry-trace" not in headers and "baggage" not in headers, (method, path)
        assert not any(k.startswith("sentry") for k in headers), (method, path, headers)
