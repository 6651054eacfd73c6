"""RillaClient (``rilla_bridge.clients.rilla``): status classification, and real HTTP against
the Rilla sandbox served on loopback from a thread of this process.

The sandbox's latency is held by the test (its sleep is replaced by a gate the test opens), so
a read timeout or a burst of concurrent requests happens for certain, not after a race."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import gevent
import pytest

from rilla_bridge.clients.rilla import (
    USER_AGENT,
    RillaClient,
    RillaResult,
    classify,
    parse_retry_after,
)
from sandbox.rilla import Fault, SandboxState, make_app
from tests.loopback import LoopbackServer
from tests.support import free_port

KEY = "sk-live-SECRET-0123456789"
REP = "rep@acme.test"
FULL = {
    "event_id": "appt-1", "user_email": REP, "start_time": "2024-06-15 14:00:00",
    "end_time": "2024-06-15 15:00:00", "title": "Estimate - Jane",
    "customer": {"id": "cust-1", "name": "Jane Smith"},
}
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
WAIT = 10.0     # seconds a test waits for something that happens at once, before failing


class FixedNow(datetime):
    """``datetime`` whose ``now()`` is NOW (for Retry-After dates)."""

    @classmethod
    def now(cls, tz: Any = None) -> FixedNow:
        return cls.fromtimestamp(NOW.timestamp(), tz)


@pytest.fixture
def fixed_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rilla_bridge.clients.rilla.datetime", FixedNow)


# -- classification -------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind"), [
    (200, "ok"), (201, "ok"), (204, "ok"),
    (400, "permanent"), (401, "permanent"), (403, "permanent"), (404, "permanent"),
    (409, "permanent"), (413, "permanent"), (422, "permanent"),
    (408, "retryable"), (425, "retryable"), (429, "retryable"),
    (500, "retryable"), (502, "retryable"), (503, "retryable"), (504, "retryable"),
    (599, "retryable"), (302, "retryable"), (100, "retryable"),
])
def test_classify_table(status: int, kind: str) -> None:
    result = classify(status, "body", None)
    assert (result.kind, result.status, result.body, result.error) == (kind, status, "body", None)


def test_classify_truncates_body_and_honours_retry_after_only_when_retryable() -> None:
    assert classify(500, "x" * 5000, None).body == "x" * 2000
    assert classify(503, "", "30").retry_after == 30.0
    assert classify(429, "", "1.5").retry_after == 1.5
    assert classify(200, "", "30").retry_after is None
    assert classify(422, "", "30").retry_after is None


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("soon", None), ("120", 120.0), (" 5 ", 5.0), ("-3", 0.0),
    ("nan", None), ("inf", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
    ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0), ("Wed, 21 Oct 2015 07:28:00", 60.0),
])
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


@pytest.mark.usefixtures("fixed_now")
def test_classify_retry_after_http_date() -> None:
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert classify(503, "", header).retry_after == 90.0
    assert parse_retry_after(header) == 90.0     # "now" defaults to the current time


# -- the sandbox on loopback ------------------------------------------------------------

class Sandbox:
    """The sandbox app, remembering the last request's headers and every client port, and
    telling waiters when a request has been answered."""

    def __init__(self) -> None:
        self.state = SandboxState({KEY: [REP], "open-org-key-1": None})
        self.flask = make_app(self.state)
        self.last_headers: dict[str, str] = {}
        self.ports: set[str] = set()
        self.answered = 0
        self.changed = threading.Condition()
        self.server = LoopbackServer(self)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.last_headers = {k: v for k, v in environ.items()
                             if k.startswith("HTTP_") or k == "CONTENT_TYPE"}
        with self.changed:
            self.ports.add(environ["REMOTE_PORT"])
        try:
            return self.flask(environ, start_response)
        finally:
            with self.changed:
                self.answered += 1
                self.changed.notify_all()

    def wait_answered(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.answered >= n, timeout=WAIT)

    @property
    def url(self) -> str:
        return self.server.url


class HeldLatency:
    """Stands in for the sandbox's latency sleep: a delayed request waits here until the test
    lets it go, or until ``together`` requests wait at once."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.delays: list[float] = []
        self.waiting = 0
        self.peak = 0
        self.open = False
        self.together: int | None = None

    def __call__(self, seconds: float = 0) -> None:
        with self.changed:
            self.delays.append(seconds)
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
            if self.together is not None and self.waiting >= self.together:
                self.open = True
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.open, timeout=WAIT)
            self.waiting -= 1

    def release(self) -> None:
        with self.changed:
            self.open = True
            self.changed.notify_all()

    def wait_held(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.waiting >= n, timeout=WAIT)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    with box.server:
        yield box


@pytest.fixture
def state(sandbox: Sandbox) -> SandboxState:
    sandbox.state.reset()
    sandbox.state.set_latency(0)
    with sandbox.changed:
        sandbox.ports.clear()
        sandbox.answered = 0
    return sandbox.state


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldLatency]:
    gate = HeldLatency()
    monkeypatch.setattr(gevent, "sleep", gate)     # what sandbox.rilla calls for latency
    yield gate
    gate.release()


@pytest.fixture
def client(sandbox: Sandbox, state: SandboxState) -> Iterator[RillaClient]:
    with RillaClient(sandbox.url, connect_timeout=2, read_timeout=5) as c:
        yield c


def assert_no_secret(result: RillaResult, client: RillaClient) -> None:
    for text in (repr(result), result.body, result.error or "", repr(client)):
        assert KEY not in text and "SECRET" not in text


def test_upsert_create_then_update(client: RillaClient, state: SandboxState) -> None:
    created = client.upsert(KEY, FULL)
    assert (created.kind, created.status) == ("ok", 200)
    assert "created" in created.body  # Accept: application/json -> {"message": ...}
    updated = client.upsert(KEY, {"event_id": "appt-1", "user_email": REP, "result": "won"})
    assert (updated.kind, updated.status) == ("ok", 200) and "updated" in updated.body
    [stored] = state.list_appointments()
    assert stored["result"] == "won" and stored["title"] == "Estimate - Jane"
    assert_no_secret(updated, client)


def test_insert_missing_field_is_permanent(client: RillaClient) -> None:
    result = client.upsert(KEY, {"event_id": "new-1", "user_email": REP, "result": "won"})
    assert (result.kind, result.status) == ("permanent", 400)
    assert result.body == "Missing some required parameters in the body"


def test_unknown_key_and_unknown_user_are_permanent_422(client: RillaClient) -> None:
    bad_key = client.upsert("not-a-key", FULL)
    assert (bad_key.kind, bad_key.status, bad_key.body) == (
        "permanent", 422, "API key is not in Rilla")
    bad_user = client.upsert(KEY, {**FULL, "user_email": "who@else.test"})
    assert (bad_user.kind, bad_user.status) == ("permanent", 422)
    assert_no_secret(bad_user, client)


def test_delete_existing_and_unknown(client: RillaClient, state: SandboxState) -> None:
    client.upsert(KEY, {**FULL, "event_id": "a/b c?d"})
    done = client.delete(KEY, "a/b c?d")
    assert (done.kind, done.status) == ("ok", 200)
    assert state.list_appointments() == []
    gone = client.delete(KEY, "a/b c?d")
    assert (gone.kind, gone.status) == ("ok", 404)
    assert [r["path"] for r in state.recent(2)] == ["/custom/appointment/a/b c?d"] * 2
    assert client.delete("not-a-key", "x").kind == "permanent"
    assert client.delete(KEY, "").kind == "permanent"


def test_faults_500_twice_then_ok(client: RillaClient, state: SandboxState) -> None:
    state.add_fault(Fault(status=500, remaining=2, retry_after="4"))
    first, second, third = (client.upsert(KEY, FULL) for _ in range(3))
    assert (first.kind, first.status, first.retry_after) == ("retryable", 500, 4.0)
    assert (second.kind, second.status) == ("retryable", 500)
    assert (third.kind, third.status) == ("ok", 200)
    assert state.stats()["upserts_by_event"] == {"appt-1": 1}


@pytest.mark.usefixtures("fixed_now")
def test_429_is_retryable_with_http_date(client: RillaClient, state: SandboxState) -> None:
    when = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    state.add_fault(Fault(status=429, remaining=1, retry_after=when))
    result = client.upsert(KEY, FULL)
    assert result.kind == "retryable" and result.status == 429
    assert result.retry_after == 30.0


def test_read_timeout_is_retryable(sandbox: Sandbox, state: SandboxState,
                                   held: HeldLatency) -> None:
    state.set_latency(600, api_key=KEY)
    with RillaClient(sandbox.url, connect_timeout=1, read_timeout=0.2) as slow:
        result = slow.upsert(KEY, FULL)
        # the client gave up while the sandbox still held the request (it holds it until
        # released): a timeout, not an answer
        held.wait_held(1)
        assert held.delays == [0.6]
    assert (result.kind, result.status) == ("retryable", None)
    assert result.error is not None and "read timeout after 0.2s" in result.error
    assert "127.0.0.1" not in result.error
    assert_no_secret(result, slow)
    # like the real Rilla, the sandbox still stores what arrived before the timeout
    held.release()
    sandbox.wait_answered(1)
    assert state.stats()["by_status"] == {"200": 1}
    assert [a["event_id"] for a in state.list_appointments()] == ["appt-1"]


def test_connection_refused_is_retryable() -> None:
    with RillaClient(f"http://127.0.0.1:{free_port()}", connect_timeout=1) as dead:
        result = dead.upsert(KEY, FULL)
    assert (result.kind, result.status) == ("retryable", None)
    assert result.error is not None and result.error.startswith("connection error")
    assert "ConnectionRefusedError" in result.error
    assert_no_secret(result, dead)


def test_headers_and_pool(client: RillaClient, sandbox: Sandbox) -> None:
    client.upsert(KEY, FULL)
    headers = sandbox.last_headers
    assert headers["HTTP_X_API_KEY"] == KEY
    assert headers["CONTENT_TYPE"] == "application/json"
    assert headers["HTTP_ACCEPT"] == "application/json"
    assert headers["HTTP_USER_AGENT"] == USER_AGENT and USER_AGENT.startswith("rilla-bridge/")
    pool = client.pool().connection_from_url(sandbox.url)
    assert pool.pool.maxsize == 256  # type: ignore[union-attr]  # > 200 greenlets
    assert client.pool().connection_pool_kw["retries"].total is False   # the caller retries
    assert headers.get("HTTP_ACCEPT_ENCODING", "identity") == "identity"   # never compressed


def test_refuses_bad_key_or_payload_without_leaking(client: RillaClient,
                                                    state: SandboxState) -> None:
    injected = client.upsert(KEY + "\r\nX-Evil: 1", FULL)
    assert (injected.kind, injected.status) == ("permanent", None)
    assert_no_secret(injected, client)
    for key in ("", " " + KEY, "k\u00e9y-0000000001"):
        assert client.upsert(key, FULL).kind == "permanent"
    assert client.upsert(KEY, {"price": float("nan")}).kind == "permanent"
    assert client.upsert(KEY, {"when": object()}).kind == "permanent"
    assert state.stats()["requests"] == 0


def test_key_never_logged(client: RillaClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client.upsert(KEY, FULL)
        client.upsert("not-a-key", FULL)
    assert caplog.records and KEY not in caplog.text


def test_pool_per_process(client: RillaClient, monkeypatch: pytest.MonkeyPatch) -> None:
    first = client.pool()
    assert client.pool() is first
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as if in a forked child
    child = client.pool()
    assert child is not first and client.pool() is child
    monkeypatch.undo()
    first.clear()


def test_concurrent_requests_share_the_pool(sandbox: Sandbox, state: SandboxState,
                                            held: HeldLatency) -> None:
    """One client, 50 threads, 100 upserts: requests overlap (20 are held in the sandbox at
    once before any is answered) and reuse the pool's connections (at most one per thread)."""
    state.set_latency(100)
    held.together = 20
    with RillaClient(sandbox.url) as shared, ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: shared.upsert(KEY, {**FULL, "event_id": f"e{i}"}),
                                range(100)))
    assert all(r.kind == "ok" for r in results)
    assert len(state.list_appointments()) == 100
    assert held.peak >= 20 and len(held.delays) == 100
    assert len(sandbox.ports) <= 50


# -- a server that misbehaves (raw sockets: what no WSGI sandbox would send) --------------

class RawServer:
    """Answers every connection on loopback with ``reply`` (raw bytes), then closes it."""

    def __init__(self, reply: bytes) -> None:
        import socket
        self.reply = reply
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(("reply", "kind", "status", "error"), [
    # cut off in the middle of the body: no answer, so retryable (it may have been stored)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\"", "retryable", None,
     "connection error"),
    # not HTTP at all
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "retryable", None, "connection error"),
    # a redirect is not followed (the key would go wherever it points): retryable, as SPEC's
    # unexpected statuses are
    (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n"
     b"\r\n", "retryable", 302, None),
    # a body that is not UTF-8 is kept, its bad bytes replaced
    (b"HTTP/1.1 422 Unprocessable\r\nContent-Length: 6\r\n\r\nbad\xff\xfe!", "permanent", 422,
     None),
])
def test_a_misbehaving_server_is_an_outcome_not_an_exception(
        reply: bytes, kind: str, status: int | None, error: str | None) -> None:
    server = RawServer(reply)
    try:
        with RillaClient(server.url, connect_timeout=2, read_timeout=2) as c:
            result = c.upsert(KEY, FULL)
    finally:
        server.close()
    assert (result.kind, result.status) == (kind, status)
    assert len(server.requests) == 1   # never retried, never redirected
    if error:
        assert result.error is not None and result.error.startswith(error)
    if status == 422:
        assert result.body == "bad\ufffd\ufffd!"
    assert_no_secret(result, c)
