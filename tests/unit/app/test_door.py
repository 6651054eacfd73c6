"""The WSGI front door (``app.door``), the one webhook path: it reads the body within the size
limit, answers 405 to anything but POST, hands the request to the handler, and writes one log
line and the intake metrics per request. Through Flask's test client, Redis faked, time from
the test's clock."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from werkzeug.test import Client

from app import create_app
from app.door import BodyTimeout, ShortBody, UnreadableBody, client_address, read_body
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS
from rilla_bridge.clock import FakeClock
from rilla_bridge.events import EventStore
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.providers import callingly, callrail
from rilla_bridge.providers.callrail import signature as callrail_signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import FIXTURES

VECTOR_KEY = "072e77e426f92738a72fe23c4d1953b4"
VECTOR_SIGNATURE = "UZAHbUdfm3GqL7qzilGozGzWV64="
ACME_KEY = "acme-signing-key-0001"
ACME_TOKEN = "acme-callingly-token-01"
ACME_RILLA = "acme-rilla-key-000001"
SECRETS = (ACME_KEY, ACME_TOKEN, ACME_RILLA, VECTOR_KEY, "cronly-signing-key-03",
           "cgonly-callingly-token-04")

TENANTS = f"""
[tenants.acme]
rilla_api_key = "{ACME_RILLA}"
[tenants.acme.callrail]
signing_key = "{ACME_KEY}"
[tenants.acme.callingly]
webhook_token = "{ACME_TOKEN}"

[tenants.vector]
rilla_api_key = "vector-rilla-key-000002"
[tenants.vector.callrail]
signing_key = "{VECTOR_KEY}"

[tenants.cronly]
rilla_api_key = "cronly-rilla-key-000003"
[tenants.cronly.callrail]
signing_key = "cronly-signing-key-03"

[tenants.cgonly]
rilla_api_key = "cgonly-rilla-key-000004"
[tenants.cgonly.callingly]
webhook_token = "cgonly-callingly-token-04"

[tenants.bare]
rilla_api_key = "bare-rilla-key-0000005"
"""

MIB = 1024 * 1024
POST_CALL = {"resource_id": "CAL123", "customer_name": "Pat Doe", "duration": "42"}
CALL_COMPLETED = (FIXTURES / "callingly" / "call_completed.json").read_bytes()


def build_app(client: Any, clock: FakeClock) -> Flask:
    app = create_app(settings=Settings(), tenants=parse_tenants(TENANTS, env={}),
                     redis_client=client, clock=clock)
    app.testing = True
    return app


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Flask:
    return build_app(fake_redis, clock)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


@pytest.fixture
def store(fake_redis: fakeredis.FakeRedis) -> EventStore:
    return EventStore(fake_redis)


def post_callrail(client: FlaskClient, body: bytes | dict[str, Any], tenant: str = "acme",
                  key: str | None = ACME_KEY, query: str = "", **kw: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = dict(kw.pop("headers", {}))
    if key is not None:
        headers["Signature"] = callrail_signature(key, raw)
    return client.post(f"/webhooks/callrail/{tenant}{query}", data=raw, headers=headers, **kw)


def post_callingly(client: FlaskClient, body: bytes | dict[str, Any], tenant: str = "acme",
                   token: str | None = ACME_TOKEN, event: str | None = None, **kw: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    params = []
    if token is not None:
        params.append(f"token={quote(token)}")
    if event is not None:
        params.append(f"event={quote(event)}")
    query = ("?" + "&".join(params)) if params else ""
    return client.post(f"/webhooks/callingly/{tenant}{query}", data=raw, **kw)


def assert_nothing_stored(redis_client: Any) -> None:
    """No event stored (a refused signature or token is only counted against its address)."""
    assert [k for k in redis_client.keys("rb:*") if not k.startswith(b"rb:authfail:")] == []
    assert redis_client.llen(QUEUE_EVENTS) == 0


def assert_error(resp: Any, code: int) -> dict[str, Any]:
    assert resp.status_code == code, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    data = resp.get_json()
    assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"]
    text = resp.get_data(as_text=True)
    for secret in SECRETS:
        assert secret not in text
    return data


# -- through the door -----------------------------------------------------------------------
def test_accepted_webhooks_through_the_door(client: FlaskClient, store: EventStore) -> None:
    raw = json.dumps(POST_CALL).encode()
    resp = post_callrail(client, raw, query="?event=call_modified")
    assert resp.status_code == 202
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == len(resp.get_data())
    data = resp.get_json()
    assert data["status"] == "queued"
    event = store.get(data["id"])
    assert event is not None and event["body"] == raw and event["kind"] == "call_modified"
    resp = post_callingly(client, CALL_COMPLETED, event="call_completed")
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    again = post_callingly(client, CALL_COMPLETED, event="call_completed")
    assert again.status_code == 200
    assert again.get_json() == {"id": resp.get_json()["id"], "status": "duplicate"}


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/octet-stream", None,
])
def test_content_type_is_not_checked(client: FlaskClient, store: EventStore,
                                     content_type: str | None) -> None:
    raw = json.dumps(POST_CALL).encode()
    kw = {"content_type": content_type} if content_type else {}
    resp = post_callrail(client, raw, **kw)
    assert resp.status_code == 202
    event = store.get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw
    resp = post_callingly(client, CALL_COMPLETED, **kw)
    assert resp.status_code == 202


@pytest.mark.parametrize("header", ["Signature", "signature", "SIGNATURE", "sIgNaTuRe"])
def test_the_signature_header_in_any_case(client: FlaskClient, store: EventStore,
                                          header: str) -> None:
    body = (FIXTURES / "callrail" / "signature_vector.body").read_bytes()
    resp = client.post("/webhooks/callrail/vector", data=body,
                       headers={header: VECTOR_SIGNATURE}, content_type="application/json")
    assert resp.status_code == 202
    event = store.get(resp.get_json()["id"])
    assert event is not None and event["body"] == body and event["call_id"] == "766970532"


def test_callingly_token_in_header_is_not_enough(client: FlaskClient,
                                                 fake_redis: fakeredis.FakeRedis) -> None:
    resp = client.post("/webhooks/callingly/acme", json={"id": 1},
                       headers={"token": ACME_TOKEN, "Authorization": f"Bearer {ACME_TOKEN}"})
    assert_error(resp, 401)
    assert_nothing_stored(fake_redis)


def test_callrail_signature_in_the_query_is_not_enough(client: FlaskClient) -> None:
    raw = json.dumps(POST_CALL).encode()
    sig = quote(callrail_signature(ACME_KEY, raw))
    assert_error(client.post(f"/webhooks/callrail/acme?Signature={sig}&signature={sig}",
                             data=raw), 401)


def test_the_query_is_parsed_with_blank_values(client: FlaskClient) -> None:
    assert_error(client.post("/webhooks/callingly/acme?token=", data=CALL_COMPLETED), 401)
    assert_error(client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}&event=",
                             data=CALL_COMPLETED), 400)
    resp = client.post(f"/webhooks/callingly/acme?token={quote(ACME_TOKEN)}&x=1&x=2",
                       data=CALL_COMPLETED)
    assert resp.status_code == 202


# -- 404 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/webhooks/callrail/nobody", "/webhooks/callingly/nobody",
    "/webhooks/callrail/cgonly", "/webhooks/callrail/bare",
    "/webhooks/callingly/cronly", "/webhooks/callingly/bare", "/webhooks/callingly/vector",
    "/webhooks/callrail/ACME", "/webhooks/callrail/", "/webhooks/other/acme",
    "/webhooks/callrail//acme", "/webhooks//callrail/acme",  # found by the fuzzer: was a 308
    "/webhooks/callrail/acme/", "/webhooks/callrail/acme/x", "/webhooks/callrail",
])
def test_unknown_tenant_or_missing_section(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                           path: str) -> None:
    raw = json.dumps(POST_CALL).encode()
    resp = client.post(f"{path}?token={ACME_TOKEN}", data=raw,
                       headers={"Signature": callrail_signature(ACME_KEY, raw)})
    assert_error(resp, 404)
    assert_nothing_stored(fake_redis)


# -- 405 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
@pytest.mark.parametrize("path", ["/webhooks/callrail/acme", "/webhooks/callingly/acme",
                                  "/webhooks/callrail/nobody"])
def test_anything_but_post_is_405(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                  method: str, path: str) -> None:
    raw = json.dumps(POST_CALL).encode()
    resp = client.open(f"{path}?token={ACME_TOKEN}", method=method, data=raw,
                       headers={"Signature": callrail_signature(ACME_KEY, raw)})
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    assert resp.headers["Content-Type"] == "application/json"
    if method != "HEAD":
        assert_error(resp, 405)
    assert_nothing_stored(fake_redis)


def test_the_front_door_is_the_only_webhook_path(app: Flask,
                                                 fake_redis: fakeredis.FakeRedis) -> None:
    """Flask itself has no webhook route: past the door a webhook URL is a JSON 404."""
    inner = Client(app.wsgi_app.wsgi_app)  # type: ignore[attr-defined]  # Flask without it
    raw = json.dumps(POST_CALL).encode()
    resp = inner.post("/webhooks/callrail/acme", data=raw,
                      headers={"Signature": callrail_signature(ACME_KEY, raw)})
    assert resp.status_code == 404
    assert resp.headers["Content-Type"] == "application/json" and resp.get_json()["error"]
    assert_nothing_stored(fake_redis)


# -- 413 ------------------------------------------------------------------------------------
def test_body_over_one_mib_with_content_length(client: FlaskClient,
                                               fake_redis: fakeredis.FakeRedis) -> None:
    raw = b'{"a": "' + b"x" * MIB + b'"}'
    resp = post_callrail(client, raw)
    data = assert_error(resp, 413)
    assert str(MIB) in data["error"]
    assert resp.headers["Connection"] == "close"
    resp = post_callingly(client, raw)
    assert_error(resp, 413)
    assert_nothing_stored(fake_redis)


def test_body_of_exactly_one_mib_is_accepted(client: FlaskClient) -> None:
    raw = b'{"a": "' + b"x" * (MIB - 9) + b'"}'
    assert len(raw) == MIB
    assert post_callrail(client, raw).status_code == 202
    other = b'{"b": "' + b"y" * (MIB - 9) + b'"}'
    assert post_callrail(client, other).status_code == 202
    assert post_callrail(client, other + b" ").status_code == 413


def test_the_limit_comes_from_settings(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    app = create_app(settings=Settings(max_body_bytes=100), redis_client=fake_redis,
                     tenants=parse_tenants(TENANTS, env={}), clock=clock)
    with app.test_client() as c:
        small = json.dumps({"resource_id": "C1", "pad": "x" * 50}).encode()
        assert len(small) <= 100
        assert post_callrail(c, small).status_code == 202
        assert_error(post_callrail(c, small + b" " * (101 - len(small))), 413)


def _chunked(client: FlaskClient, url: str, raw: bytes, headers: dict[str, str]) -> Any:
    # A server that de-chunks (gunicorn) marks the stream terminated and sends no length.
    return client.post(url, input_stream=io.BytesIO(raw),
                       headers={**headers, "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})


def test_body_over_one_mib_chunked_without_length(client: FlaskClient,
                                                  fake_redis: fakeredis.FakeRedis) -> None:
    raw = b'{"a": "' + b"x" * MIB + b'"}'
    resp = _chunked(client, "/webhooks/callrail/acme", raw,
                    {"Signature": callrail_signature(ACME_KEY, raw)})
    assert_error(resp, 413)
    resp = _chunked(client, f"/webhooks/callingly/acme?token={ACME_TOKEN}", raw, {})
    assert_error(resp, 413)
    assert_nothing_stored(fake_redis)


def test_chunked_body_under_limit_is_accepted(client: FlaskClient, store: EventStore) -> None:
    raw = json.dumps({**POST_CALL, "pad": "y" * 200_000}).encode()
    resp = _chunked(client, "/webhooks/callrail/acme", raw,
                    {"Signature": callrail_signature(ACME_KEY, raw)})
    assert resp.status_code == 202
    event = store.get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw


# -- read_body ------------------------------------------------------------------------------
class CountingStream(io.BytesIO):
    """An input stream that remembers how many bytes were read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk


def _environ(stream: io.RawIOBase | io.BytesIO, length: str | None,
             terminated: bool = False) -> dict[str, Any]:
    env: dict[str, Any] = {"wsgi.input": stream, "REQUEST_METHOD": "POST"}
    if length is not None:
        env["CONTENT_LENGTH"] = length
    if terminated:
        env["wsgi.input_terminated"] = True
    return env


def test_read_body_with_a_length_reads_exactly_that() -> None:
    stream = CountingStream(b"0123456789tail")
    assert read_body(_environ(stream, "10"), limit=10) == b"0123456789"
    assert stream.taken == 10


def test_read_body_refuses_a_declared_length_over_the_limit_without_reading() -> None:
    stream = CountingStream(b"x" * 50)
    assert read_body(_environ(stream, "11"), limit=10) is None
    assert stream.taken == 0


def test_read_body_short_of_its_length_is_short() -> None:
    with pytest.raises(ShortBody):
        read_body(_environ(CountingStream(b"abc"), "10"), limit=100)


def test_read_body_terminated_stream_reads_at_most_limit_plus_one() -> None:
    stream = CountingStream(b"y" * 1000)
    assert read_body(_environ(stream, None, terminated=True), limit=100) is None
    assert stream.taken == 101
    stream = CountingStream(b"y" * 100)
    assert read_body(_environ(stream, None, terminated=True), limit=100) == b"y" * 100


@pytest.mark.parametrize("length", [None, "", "abc", "-5", "\u0661\u0662"])
def test_read_body_without_a_usable_length_or_end_is_empty(length: str | None) -> None:
    """No Content-Length and no terminated stream: nothing is read (werkzeug's rule), so the
    handler answers 400 'empty body' instead of waiting for bytes that may never come."""
    stream = CountingStream(b'{"a": 1}')
    assert read_body(_environ(stream, length), limit=100) == b""
    assert stream.taken == 0


def test_body_shorter_than_content_length_is_400_and_stores_nothing(
        app: Flask, fake_redis: fakeredis.FakeRedis) -> None:
    """A client that hangs up mid-body: 400 (not a 401 for a signature over half a body)."""
    raw = json.dumps(POST_CALL).encode()
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhooks/callrail/acme",
               "QUERY_STRING": "", "CONTENT_LENGTH": str(len(raw) + 50),
               "wsgi.input": io.BytesIO(raw), "HTTP_SIGNATURE": callrail_signature(ACME_KEY, raw),
               "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO()}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append(status)

    body = b"".join(app(environ, start_response))
    assert seen == ["400 BAD REQUEST"]
    assert "Content-Length" in json.loads(body)["error"]
    assert_nothing_stored(fake_redis)


# -- a body the server cannot hand over -----------------------------------------------------
BODY_MARK = "RAW-BODY-CUSTOMER-Kaylah-Mills"


class InvalidChunkSize(Exception):
    """Like gunicorn's: its text quotes the raw bytes it choked on."""


class BrokenStream(io.RawIOBase):
    """A ``wsgi.input`` that fails the way a server's does on a malformed chunked body or a
    client that hung up mid-body."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise self.exc


@pytest.mark.parametrize("exc", [InvalidChunkSize(f"Invalid chunk size: {BODY_MARK!r}"),
                                 ConnectionResetError(104, f"reset after {BODY_MARK}"),
                                 ValueError(BODY_MARK)])
@pytest.mark.parametrize("length", [None, "300"])
def test_read_body_turns_any_stream_error_into_unreadable_without_its_text(
        exc: Exception, length: str | None) -> None:
    with pytest.raises(UnreadableBody) as raised:
        read_body(_environ(BrokenStream(exc), length, terminated=True), limit=1000)
    assert raised.value.status == 400
    assert BODY_MARK not in str(raised.value) and type(exc).__name__ in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_read_body_passes_a_deadline_on() -> None:
    with pytest.raises(BodyTimeout) as raised:
        read_body(_environ(BrokenStream(BodyTimeout("no body within 10 s")), "30"), limit=100)
    assert raised.value.status == 408


@pytest.mark.parametrize(("exc", "status"), [
    (InvalidChunkSize(f"Invalid chunk size: {BODY_MARK!r}"), "400 BAD REQUEST"),
    (ConnectionResetError(104, BODY_MARK), "400 BAD REQUEST"),
    (BodyTimeout("body not received within 10 s"), "408 REQUEST TIMEOUT")])
def test_unreadable_body_is_answered_quietly_and_never_logged(
        app: Flask, fake_redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture,
        sentry_transport: Any, exc: Exception, status: str) -> None:
    """Issue 14: a malformed chunked body or a client gone mid-body got a 500, an ERROR
    traceback and a Sentry event quoting the raw bytes. Now: 400 (408 past the deadline), the
    connection closed, one request line, no error, no Sentry event, no body bytes anywhere."""
    from rilla_bridge.observability import JsonFormatter, init_sentry

    init_sentry("https://public@127.0.0.1:9/1", environment="test", component="web",
                transport=sentry_transport)
    caplog.set_level(logging.DEBUG)
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhooks/callrail/acme",
               "QUERY_STRING": "", "HTTP_TRANSFER_ENCODING": "chunked",
               "wsgi.input_terminated": True, "wsgi.input": BrokenStream(exc),
               "HTTP_SIGNATURE": "x", "SERVER_NAME": "t", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.errors": io.StringIO()}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append((status, headers))

    body = b"".join(app(environ, start_response))
    [(line, headers)] = seen
    assert line == status
    assert ("Connection", "close") in headers
    assert json.loads(body)["error"] and BODY_MARK.encode() not in body
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    [request] = [r for r in caplog.records if r.getMessage() == "request"]
    assert request.status == int(status[:3])  # type: ignore[attr-defined]
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert BODY_MARK not in text and "Traceback" not in text
    assert sentry_transport.events == []
    assert_nothing_stored(fake_redis)


# -- order: the size limit comes first ------------------------------------------------------
def test_order_size_before_tenant(client: FlaskClient) -> None:
    big = b"x" * (MIB + 1)
    assert_error(client.post("/webhooks/callrail/nobody", data=big), 413)
    assert_error(client.post("/webhooks/callingly/nobody", data=big), 413)
    assert_error(client.post("/webhooks/callrail/bare", data=big), 413)


def test_order_size_before_signature(client: FlaskClient) -> None:
    big = b"x" * (MIB + 1)
    assert_error(client.post("/webhooks/callrail/acme", data=big,
                             headers={"Signature": "bad"}), 413)
    assert_error(client.post("/webhooks/callingly/acme?token=bad", data=big), 413)


def test_order_method_before_size(client: FlaskClient) -> None:
    assert_error(client.put("/webhooks/callrail/acme", data=b"x" * (MIB + 1)), 405)


def test_order_tenant_before_signature_before_body(client: FlaskClient) -> None:
    assert_error(client.post("/webhooks/callrail/nobody", data=b"[",
                             headers={"Signature": "bad"}), 404)
    assert_error(client.post("/webhooks/callrail/acme", data=b"[",
                             headers={"Signature": "bad"}), 401)
    assert_error(client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}", data=b"["), 400)


# -- 503 and 500 ----------------------------------------------------------------------------
def test_redis_down_is_a_503_with_retry_after(clock: FakeClock) -> None:
    server = fakeredis.FakeServer()
    redis_client = fakeredis.FakeRedis(server=server)
    app = build_app(redis_client, clock)
    try:
        with app.test_client() as client:
            server.connected = False
            resp = post_callrail(client, POST_CALL)
            assert_error(resp, 503)
            assert resp.headers["Retry-After"] == "5"
            resp = post_callingly(client, {"id": 9, "seconds": 3})
            assert_error(resp, 503)
            assert resp.headers["Retry-After"] == "5"
            assert_error(post_callrail(client, POST_CALL, key="wrong-key-000"), 401)
            server.connected = True
            assert post_callrail(client, POST_CALL).status_code == 202
    finally:
        redis_client.close()


def test_unexpected_error_is_a_json_500_logged_and_counted(
        app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door answers webhooks without Flask; a bug there must still be a JSON 500
    with the error logged (Sentry's logging integration reports it) and a request line."""
    def broken(self: Lifecycle, **kw: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(Lifecycle, "receive", broken)
    before = _webhooks("callrail", "unknown", "500")
    caplog.set_level(logging.INFO)
    resp = post_callrail(client, POST_CALL)
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal error"}
    assert resp.headers["Content-Type"] == "application/json"
    assert any(r.levelno == logging.ERROR and r.exc_info and r.getMessage() == "unhandled error"
               for r in caplog.records)
    (line,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert line.status == 500  # type: ignore[attr-defined]
    assert line.source == "callrail"  # type: ignore[attr-defined]
    assert _webhooks("callrail", "unknown", "500") == before + 1


def test_a_failing_log_line_or_metric_does_not_fail_the_webhook(
        client: FlaskClient, store: EventStore, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise ValueError("metrics down")

    monkeypatch.setattr("app.door.observe", broken)
    caplog.set_level(logging.INFO)
    resp = post_callrail(client, POST_CALL)
    assert resp.status_code == 202
    assert store.get(resp.get_json()["id"]) is not None
    assert any(r.getMessage() == "could not log or count a request" and r.exc_info
               for r in caplog.records)


# -- secrets, logs and metrics --------------------------------------------------------------
def _record_text(rec: logging.LogRecord) -> str:
    return rec.getMessage() + " " + " ".join(f"{k}={v!r}" for k, v in vars(rec).items())


def _webhooks(source: str, tenant: str, code: str) -> float:
    value = REGISTRY.get_sample_value("rilla_bridge_webhooks_total",
                                      {"source": source, "tenant": tenant, "code": code})
    return value or 0.0


def _intake_count(source: str) -> float:
    value = REGISTRY.get_sample_value("rilla_bridge_intake_seconds_count", {"source": source})
    return value or 0.0


def test_no_secret_or_query_string_in_replies_or_logs(client: FlaskClient,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    raw = json.dumps(POST_CALL).encode()
    good = callrail_signature(ACME_KEY, raw)
    requests_made = [
        client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}", data=b"{}"),
        client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}x", data=b"{}"),
        client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}&event=bad", data=b"{}"),
        client.post(f"/webhooks/callingly/acme?token={ACME_TOKEN}", data=b"not json"),
        client.post(f"/webhooks/callingly/cronly?token={ACME_TOKEN}", data=b"{}"),
        client.post(f"/webhooks/callingly/nobody?token={ACME_TOKEN}", data=b"{}"),
        client.post("/webhooks/callrail/acme", data=raw, headers={"Signature": good}),
        client.post("/webhooks/callrail/acme", data=raw + b" ", headers={"Signature": good}),
        client.post(f"/webhooks/callrail/acme?event=nope&token={ACME_TOKEN}", data=raw,
                    headers={"Signature": good}),
        client.post(f"/webhooks/callrail/acme?x={ACME_KEY}", data=b"[]",
                    headers={"Signature": callrail_signature(ACME_KEY, b"[]")}),
        client.post("/webhooks/callrail/acme", data=b"x" * (MIB + 1),
                    headers={"Signature": ACME_KEY}),
        client.get(f"/webhooks/callingly/acme?token={ACME_TOKEN}"),
        client.post(f"/webhooks/callrail/acme?token={ACME_TOKEN}", data=raw,
                    headers={"Signature": good}),
        client.get(f"/healthz?token={ACME_TOKEN}"),
        client.get(f"/nothing/here?token={ACME_TOKEN}"),
    ]
    statuses = [r.status_code for r in requests_made]
    assert statuses == [202, 401, 400, 400, 404, 404, 202, 401, 400, 400, 413, 405, 200, 200,
                        404]
    for resp in requests_made:
        text = resp.get_data(as_text=True)
        for secret in SECRETS:
            assert secret not in text
        assert good not in text
    request_lines = [r for r in caplog.records if r.getMessage() == "request"]
    assert len(request_lines) == len(requests_made)
    for rec in caplog.records:
        text = _record_text(rec)
        for secret in SECRETS:
            assert secret not in text
        assert good not in text
        assert "token=" not in text
        assert "?" not in str(getattr(rec, "path", ""))
    assert [getattr(r, "status", None) for r in request_lines] == statuses


def test_log_line_fields(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    raw = json.dumps(POST_CALL).encode()
    resp = post_callrail(client, raw, query="?event=post_call")
    assert resp.status_code == 202
    (rec,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert rec.name == "rilla_bridge.web"
    assert rec.method == "POST"  # type: ignore[attr-defined]
    assert rec.path == "/webhooks/callrail/acme"  # type: ignore[attr-defined]
    assert rec.status == 202  # type: ignore[attr-defined]
    assert rec.tenant == "acme"  # type: ignore[attr-defined]
    assert rec.source == "callrail"  # type: ignore[attr-defined]
    assert rec.kind == "post_call"  # type: ignore[attr-defined]
    assert rec.event_id == resp.get_json()["id"]  # type: ignore[attr-defined]
    assert rec.bytes == len(raw)  # type: ignore[attr-defined]
    assert isinstance(rec.ms, float) and rec.ms >= 0  # type: ignore[attr-defined]


def test_log_line_of_a_rejection_and_of_another_path(client: FlaskClient,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    post_callrail(client, POST_CALL, tenant="nobody")
    post_callingly(client, CALL_COMPLETED, token="bad")
    client.get("/healthz")
    client.get("/webhooks/callrail/\u00e9t\u00e9")
    lines = [r for r in caplog.records if r.getMessage() == "request"]
    got = [(r.status, r.source, r.tenant, r.kind, r.event_id, r.path)  # type: ignore[attr-defined]
           for r in lines]
    assert got == [
        (404, "callrail", None, None, None, "/webhooks/callrail/nobody"),
        (401, "callingly", "acme", None, None, "/webhooks/callingly/acme"),
        (200, None, None, None, None, "/healthz"),
        (405, "callrail", None, None, None, "/webhooks/callrail/\u00e9t\u00e9"),
    ]


def test_metrics_count_every_webhook_reply(client: FlaskClient) -> None:
    cases = [("callrail", "acme", "202"), ("callrail", "acme", "401"),
             ("callrail", "unknown", "404"), ("callingly", "acme", "400"),
             ("callrail", "unknown", "413"), ("callingly", "unknown", "405")]
    before = {c: _webhooks(*c) for c in cases}
    timed = {s: _intake_count(s) for s in ("callrail", "callingly")}
    post_callrail(client, POST_CALL)
    post_callrail(client, POST_CALL, key="wrong-key-0000")
    post_callrail(client, POST_CALL, tenant="nobody")
    post_callingly(client, b"[]")
    client.post("/webhooks/callrail/acme", data=b"x" * (MIB + 1))
    client.get("/webhooks/callingly/acme")
    client.get("/healthz")       # not a webhook: not counted
    for c in cases:
        assert _webhooks(*c) == before[c] + 1, c
    assert _intake_count("callrail") == timed["callrail"] + 4
    assert _intake_count("callingly") == timed["callingly"] + 2


def test_over_the_intake_limit_is_a_429_counted_for_its_tenant(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings=Settings(tenant_intake_per_second=1),
                     tenants=parse_tenants(TENANTS, env={}), redis_client=fake_redis,
                     clock=clock)
    app.testing = True
    before = _webhooks("callrail", "acme", "429")
    caplog.set_level(logging.INFO)
    with app.test_client() as client:
        assert [post_callrail(client, {**POST_CALL, "n": n}).status_code for n in (1, 2)] == [
            202, 202]
        resp = post_callrail(client, {**POST_CALL, "n": 3})
    assert_error(resp, 429)
    assert resp.status == "429 TOO MANY REQUESTS" and resp.headers["Retry-After"] == "1"
    assert _webhooks("callrail", "acme", "429") == before + 1
    last = [r for r in caplog.records if r.getMessage() == "request"][-1]
    assert (last.status, last.tenant, last.kind) == (429, "acme", None)  # type: ignore[attr-defined]


# -- hypothesis fuzz ------------------------------------------------------------------------
# text that may hold lone surrogates: json.dumps escapes them ("\\ud800"), still valid JSON
_any_text = st.lists(st.characters() | st.integers(0xD800, 0xDFFF).map(chr),
                     max_size=20).map("".join)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=10,
)
_json_objects = st.dictionaries(
    st.sampled_from(["resource_id", "id", "changes", "content", "form_data", "agent", "lead",
                     "seconds", "recording_url", "fname", "updatedField", "answers"])
    | st.text(max_size=10),
    _json_values, max_size=6,
).map(lambda d: json.dumps(d).encode())
_bodies = st.one_of(st.binary(max_size=300), _json_objects,
                    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")))
_tenants = st.one_of(st.sampled_from(["acme", "vector", "cronly", "cgonly", "bare", "nobody"]),
                     st.text(min_size=1, max_size=20))
_events = st.one_of(st.none(), st.sampled_from(sorted(callrail.KINDS | callingly.KINDS)),
                    st.text(max_size=20))
_header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "host"})
_header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
_headers = st.dictionaries(_header_names, _header_values, max_size=4)
_query = st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3)


def _fuzz_client() -> tuple[fakeredis.FakeRedis, FlaskClient]:
    redis_client = fakeredis.FakeRedis()
    return redis_client, build_app(redis_client, FakeClock()).test_client()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(["callrail", "callingly"]), tenant=_tenants, body=_bodies,
       headers=_headers, query=_query, event=_events,
       auth=st.sampled_from(["good", "bad", "none"]), content_type=st.none() | _header_values,
       method=st.sampled_from(["POST"] * 9 + ["GET", "PUT"]))
def test_fuzz_intake_never_5xx_and_rejections_store_nothing(
        source: str, tenant: str, body: bytes, headers: dict[str, str], query: dict[str, str],
        event: str | None, auth: str, content_type: str | None, method: str) -> None:
    redis_client, client = _fuzz_client()
    try:
        params = dict(query)
        headers = dict(headers)
        if event is not None:
            params["event"] = event
        if source == "callrail":
            headers = {k: v for k, v in headers.items() if k.lower() != "signature"}
            key = {"acme": ACME_KEY, "vector": VECTOR_KEY,
                   "cronly": "cronly-signing-key-03"}.get(tenant, "x-key-0000000")
            if auth == "good":
                headers["Signature"] = callrail_signature(key, body)
            elif auth == "bad":
                headers["Signature"] = callrail_signature(key + "x", body)
        else:
            params.pop("token", None)
            token = {"acme": ACME_TOKEN, "cgonly": "cgonly-callingly-token-04"}.get(tenant, "t")
            if auth == "good":
                params["token"] = token
            elif auth == "bad":
                params["token"] = token + "x"
        url = f"/webhooks/{source}/{quote(tenant, safe='')}"
        resp = client.open(url, method=method, data=body, headers=headers, query_string=params,
                           content_type=content_type)
        assert resp.status_code < 500, resp.get_data(as_text=True)
        text = resp.get_data(as_text=True)
        for secret in SECRETS:
            assert secret not in text
        if resp.status_code in (200, 202):
            assert method == "POST"
            data = resp.get_json()
            assert data["status"] in ("queued", "skipped", "duplicate")
            entries: Any = redis_client.xrange(keys.HISTORY)
            ((_, rec),) = entries                             # its `received` record
            received = json.loads(rec[b"d"])
            assert (received["id"], received["tenant"], received["source"]) == (
                data["id"], tenant, source)
            stored = EventStore(redis_client).get(data["id"])
            if data["status"] == "queued":
                assert stored is not None and stored["tenant"] == tenant
                assert stored["source"] == source and stored["body"] == body
                assert rec[b"b"] == body
                assert redis_client.llen(QUEUE_EVENTS) == 1
                assert redis_client.zcard(keys.inflight(tenant)) == 1
                assert redis_client.zcard(keys.open_events(tenant)) == 1
            elif data["status"] == "skipped":       # a lead event: finished, body not kept
                assert stored is None and b"b" not in rec
                assert redis_client.llen(QUEUE_EVENTS) == 0
        else:
            assert resp.status_code in (400, 401, 404, 405, 413)
            if method != "POST":
                assert resp.status_code in (404, 405)
            assert resp.get_json()["error"]
            # A 400 comes after the tenant's intake limit (SPEC's order): the refused body
            # counted against it, and that count is all it left in Redis.
            counted = [keys.intake_limit(tenant).encode()] if resp.status_code == 400 else []
            # A 401 is counted against the client's address (the repeated-401 throttle).
            counted += [keys.auth_failures("127.0.0.1").encode()] if resp.status_code == 401 else []
            assert redis_client.keys("*") == counted
            assert redis_client.llen(QUEUE_EVENTS) == 0
    finally:
        redis_client.close()


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=400), signature=_header_values)
def test_fuzz_random_signatures_are_refused(body: bytes, signature: str) -> None:
    redis_client, client = _fuzz_client()
    try:
        if signature.strip() == callrail_signature(ACME_KEY, body):
            return
        resp = client.post("/webhooks/callrail/acme", data=body,
                           headers={"Signature": signature})
        assert resp.status_code == 401
        assert redis_client.keys("rb:*") == [keys.auth_failures("127.0.0.1").encode()]
    finally:
        redis_client.close()


# -- a signing key or token being rotated: either of two verifies at the door -----------------

OLD_KEY, NEW_KEY = "rot-old-signing-key-01", "rot-new-signing-key-02"
OLD_TOKEN, NEW_TOKEN = "rot-old-callingly-tok-1", "rot-new-callingly-tok-2"
ROTATING = f"""
[tenants.rot]
rilla_api_key = "rot-rilla-key-00000001"
[tenants.rot.callrail]
signing_key = ["{OLD_KEY}", "{NEW_KEY}"]
[tenants.rot.callingly]
webhook_token = ["{OLD_TOKEN}", "{NEW_TOKEN}"]
"""


def test_both_keys_and_both_tokens_of_a_rotation_verify_at_the_door(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    app = create_app(settings=Settings(), tenants=parse_tenants(ROTATING, env={}),
                     redis_client=fake_redis, clock=clock)
    with app.test_client() as c:
        for n, key in enumerate((OLD_KEY, NEW_KEY)):
            r = post_callrail(c, {**POST_CALL, "resource_id": f"CALrot{n}"}, tenant="rot",
                              key=key)
            assert r.status_code == 202, r.get_data(as_text=True)
        assert_error(post_callrail(c, {**POST_CALL, "resource_id": "CALrot9"}, tenant="rot",
                                   key="rot-other-signing-key-3"), 401)
        body = json.loads(CALL_COMPLETED)
        for n, token in enumerate((OLD_TOKEN, NEW_TOKEN)):
            r = post_callingly(c, {**body, "id": 900 + n}, tenant="rot", token=token)
            assert r.status_code == 202, r.get_data(as_text=True)
        assert_error(post_callingly(c, {**body, "id": 909}, tenant="rot",
                                    token="rot-other-callingly-t3"), 401)


def test_a_reloaded_tenants_file_takes_effect_at_the_door(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, tmp_path: Any) -> None:
    """The rotation done live: the file gains the new key, the web reloads it (no restart);
    the old key keeps verifying, and a tenant added to the file is served."""
    from rilla_bridge.tenant_config import LiveTenants, TenantsReloader, load_config

    path = tmp_path / "tenants.toml"
    path.write_text(ROTATING.replace(f'["{OLD_KEY}", "{NEW_KEY}"]', f'"{OLD_KEY}"'))
    settings = Settings(tenants_file=str(path))
    live = LiveTenants(load_config(settings, env={}))
    app = create_app(settings=settings, tenants=live, redis_client=fake_redis, clock=clock)
    with app.test_client() as c:
        assert_error(post_callrail(c, POST_CALL, tenant="rot", key=NEW_KEY), 401)
        path.write_text(ROTATING + TENANTS)
        reloader = TenantsReloader(settings, live, clock, env={})
        assert [reloader.poll(), reloader.poll()] == ["settling", "reloaded"]
        assert post_callrail(c, POST_CALL, tenant="rot", key=NEW_KEY).status_code == 202
        assert post_callrail(c, {**POST_CALL, "resource_id": "CAL2"}, tenant="rot",
                             key=OLD_KEY).status_code == 202
        assert post_callrail(c, POST_CALL, tenant="acme").status_code == 202


# -- the client's address (the repeated-401 throttle) -----------------------------------------
@pytest.mark.parametrize(("environ", "trust", "expected"), [
    ({"REMOTE_ADDR": "10.1.2.3"}, False, "10.1.2.3"),
    ({"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}, False, "10.1.2.3"),
    # behind Heroku's router: the last entry is the one the router added
    ({"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.7"}, True,
     "203.0.113.7"),
    ({"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": " "}, True, "10.1.2.3"),
    ({"REMOTE_ADDR": "10.1.2.3"}, True, "10.1.2.3"),
    ({}, False, ""),
])
def test_client_address(environ: dict[str, Any], trust: bool, expected: str) -> None:
    assert client_address(environ, trust) == expected


def test_repeated_401s_from_one_address_get_429_through_the_app(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """Behind a proxy (TRUST_FORWARDED_FOR): an address that keeps failing is slowed; a
    spoofed X-Forwarded-For first entry does not change its address; its valid webhooks and
    other addresses' are answered as ever."""
    app = create_app(settings=Settings(auth_failures_per_minute=3, trust_forwarded_for=True),
                     tenants=parse_tenants(TENANTS, env={}), redis_client=fake_redis,
                     clock=clock)
    with app.test_client() as c:
        for i in range(3):
            spoof = {"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.7"}
            assert post_callrail(c, POST_CALL, key="wrong-key", headers=spoof).status_code == 401
        again = post_callrail(c, POST_CALL, key="wrong-key",
                              headers={"X-Forwarded-For": "203.0.113.7"})
        assert again.status_code == 429 and 1 <= int(again.headers["Retry-After"]) <= 60
        assert ACME_KEY not in again.get_data(as_text=True)
        ok = post_callrail(c, POST_CALL, headers={"X-Forwarded-For": "203.0.113.7"})
        assert ok.status_code == 202
        other = post_callrail(c, POST_CALL, key="wrong-key",
                              headers={"X-Forwarded-For": "198.51.100.9"})
        assert other.status_code == 401
