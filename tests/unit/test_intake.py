"""Webhook intake (SPEC "Webhook intake") through Flask's test client, Redis faked."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from app.verify import CALLINGLY_KINDS, CALLRAIL_KINDS, callrail_signature
from rilla_bridge.events import EventStore
from rilla_bridge.settings import Settings
from rilla_bridge.taskqueue import QUEUE_EVENTS, TASK_PROCESS_EVENT
from rilla_bridge.tenants import parse_tenants

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VECTOR_KEY = "072e77e426f92738a72fe23c4d1953b4"
VECTOR_SIGNATURE = "UZAHbUdfm3GqL7qzilGozGzWV64="
VECTOR_SHA256 = "4c08427068fb350b43abc01ec131501ca0548945d483886f1a48c9937bef961a"

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


def build_app(client: Any) -> Flask:
    app = create_app(settings=Settings(), tenants=parse_tenants(TENANTS, env={}),
                     redis_client=client)
    app.testing = True
    return app


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis) -> Flask:
    return build_app(fake_redis)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


def store_of(app: Flask) -> EventStore:
    store: EventStore = app.config["RB_STORE"]
    return store


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
    assert redis_client.keys("rb:*") == []
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


# -- 202 / 200 ------------------------------------------------------------------------------
def test_callrail_accepted_is_stored_and_queued(app: Flask, client: FlaskClient,
                                                fake_redis: fakeredis.FakeRedis) -> None:
    raw = json.dumps(POST_CALL).encode()
    resp = post_callrail(client, raw)
    assert resp.status_code == 202
    data = resp.get_json()
    assert set(data) == {"id", "status"}
    assert data["status"] == "queued"
    event = store_of(app).get(data["id"])
    assert event is not None
    assert event["tenant"] == "acme"
    assert event["source"] == "callrail"
    assert event["kind"] == "post_call"
    assert event["call_id"] == "CAL123"
    assert event["body"] == raw
    assert event["status"] == "queued"
    assert event["sha256"] == hashlib.sha256(raw).hexdigest()
    messages = fake_redis.lrange(QUEUE_EVENTS, 0, -1)
    assert len(messages) == 1
    msg = json.loads(messages[0])
    assert msg["headers"]["task"] == TASK_PROCESS_EVENT
    args = json.loads(base64.b64decode(msg["body"]))[0]
    assert args == [data["id"]]
    assert fake_redis.zscore("rb:pending", data["id"]) is not None


def test_callingly_accepted_is_stored_and_queued(app: Flask, client: FlaskClient,
                                                 fake_redis: fakeredis.FakeRedis) -> None:
    raw = (FIXTURES / "callingly" / "call_completed.json").read_bytes()
    resp = post_callingly(client, raw)
    assert resp.status_code == 202
    data = resp.get_json()
    assert data["status"] == "queued"
    event = store_of(app).get(data["id"])
    assert event is not None
    assert (event["tenant"], event["source"], event["kind"]) == ("acme", "callingly",
                                                                  "call_completed")
    assert event["call_id"] == str(json.loads(raw)["id"])
    assert event["body"] == raw
    assert fake_redis.llen(QUEUE_EVENTS) == 1


def test_identical_body_is_a_duplicate_with_the_same_id(client: FlaskClient,
                                                        fake_redis: fakeredis.FakeRedis) -> None:
    first = post_callrail(client, POST_CALL)
    second = post_callrail(client, POST_CALL)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.get_json() == {"id": first.get_json()["id"], "status": "duplicate"}
    assert fake_redis.llen(QUEUE_EVENTS) == 1
    assert len(fake_redis.keys("rb:ev:*")) == 1
    # a different body is a new event
    third = post_callrail(client, {**POST_CALL, "duration": "43"})
    assert third.status_code == 202
    assert third.get_json()["id"] != first.get_json()["id"]


def test_callingly_duplicate(client: FlaskClient) -> None:
    raw = (FIXTURES / "callingly" / "call_completed.json").read_bytes()
    first = post_callingly(client, raw)
    second = post_callingly(client, raw)
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.get_json() == {"id": first.get_json()["id"], "status": "duplicate"}


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/octet-stream", None,
])
def test_content_type_is_not_checked(app: Flask, client: FlaskClient,
                                     content_type: str | None) -> None:
    raw = json.dumps(POST_CALL).encode()
    kw = {"content_type": content_type} if content_type else {}
    resp = post_callrail(client, raw, **kw)
    assert resp.status_code == 202
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw
    resp = post_callingly(client, (FIXTURES / "callingly" / "call_completed.json").read_bytes(),
                          **kw)
    assert resp.status_code == 202


# -- 401 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("signature", [
    None, "", "   ", "not-base64", callrail_signature("wrong-key-0000000", b"{}"),
    callrail_signature(ACME_KEY, b"{}").lower(),
])
def test_callrail_bad_or_missing_signature(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                           signature: str | None) -> None:
    headers = {} if signature is None else {"Signature": signature}
    resp = client.post("/webhooks/callrail/acme", data=json.dumps(POST_CALL), headers=headers)
    assert_error(resp, 401)
    assert_nothing_stored(fake_redis)


def test_callrail_signature_of_another_tenant_is_refused(client: FlaskClient,
                                                         fake_redis: fakeredis.FakeRedis) -> None:
    resp = post_callrail(client, POST_CALL, tenant="acme", key="cronly-signing-key-03")
    assert_error(resp, 401)
    assert_nothing_stored(fake_redis)


@pytest.mark.parametrize("token", [None, "", "wrong", ACME_TOKEN + "x", ACME_TOKEN[:-1],
                                   "cgonly-callingly-token-04", ACME_TOKEN.upper()])
def test_callingly_bad_or_missing_token(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                        token: str | None) -> None:
    resp = post_callingly(client, {"id": 1, "seconds": 3}, token=token)
    assert_error(resp, 401)
    assert_nothing_stored(fake_redis)


def test_callingly_token_in_header_is_not_enough(client: FlaskClient) -> None:
    resp = client.post("/webhooks/callingly/acme", json={"id": 1},
                       headers={"token": ACME_TOKEN, "Authorization": f"Bearer {ACME_TOKEN}"})
    assert_error(resp, 401)


# -- 404 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/webhooks/callrail/nobody", "/webhooks/callingly/nobody",
    "/webhooks/callrail/cgonly", "/webhooks/callrail/bare",
    "/webhooks/callingly/cronly", "/webhooks/callingly/bare", "/webhooks/callingly/vector",
    "/webhooks/callrail/ACME", "/webhooks/callrail/", "/webhooks/other/acme",
    "/webhooks/callrail//acme", "/webhooks//callrail/acme",  # found by the fuzzer: was a 308
])
def test_unknown_tenant_or_missing_section(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                           path: str) -> None:
    raw = json.dumps(POST_CALL).encode()
    resp = client.post(f"{path}?token={ACME_TOKEN}", data=raw,
                       headers={"Signature": callrail_signature(ACME_KEY, raw)})
    assert_error(resp, 404)
    assert_nothing_stored(fake_redis)


# -- 400 ------------------------------------------------------------------------------------
BAD_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe{}", id="invalid-utf8"),
    pytest.param(b'{"a": "\xc3"}', id="truncated-utf8"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"a": 1', id="truncated-json"),
    pytest.param(b"[1, 2]", id="array"),
    pytest.param(b"[]", id="empty-array"),
    pytest.param(b"42", id="number"),
    pytest.param(b'"text"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="bool"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-nesting"),
    pytest.param(b"1" * 10_000, id="huge-int"),
]


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_callrail_bad_body(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                           raw: bytes) -> None:
    assert_error(post_callrail(client, raw), 400)
    assert_nothing_stored(fake_redis)


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_callingly_bad_body(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                            raw: bytes) -> None:
    assert_error(post_callingly(client, raw), 400)
    assert_nothing_stored(fake_redis)


@pytest.mark.parametrize("event", ["", "post-call", "POST_CALL", "call_completed", "nope",
                                   "post_call ", "x" * 5000])
def test_callrail_unknown_event_param(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                      event: str) -> None:
    resp = post_callrail(client, POST_CALL, query=f"?event={quote(event)}")
    data = assert_error(resp, 400)
    assert len(data["error"]) < 1000
    assert_nothing_stored(fake_redis)


@pytest.mark.parametrize("event", ["", "post_call", "lead", "CALL_COMPLETED"])
def test_callingly_unknown_event_param(client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                                       event: str) -> None:
    resp = post_callingly(client, {"id": 1, "seconds": 5}, event=event)
    assert_error(resp, 400)
    assert_nothing_stored(fake_redis)


# -- 413 ------------------------------------------------------------------------------------
def test_body_over_one_mib_with_content_length(client: FlaskClient,
                                               fake_redis: fakeredis.FakeRedis) -> None:
    raw = b'{"a": "' + b"x" * MIB + b'"}'
    resp = post_callrail(client, raw)
    assert_error(resp, 413)
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


def test_chunked_body_under_limit_is_accepted(app: Flask, client: FlaskClient) -> None:
    raw = json.dumps({**POST_CALL, "pad": "y" * 200_000}).encode()
    resp = _chunked(client, "/webhooks/callrail/acme", raw,
                    {"Signature": callrail_signature(ACME_KEY, raw)})
    assert resp.status_code == 202
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw


# -- order ----------------------------------------------------------------------------------
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


def test_order_tenant_before_signature(client: FlaskClient) -> None:
    assert_error(client.post("/webhooks/callrail/nobody", data=b"{}",
                             headers={"Signature": "bad"}), 404)
    assert_error(client.post("/webhooks/callrail/cgonly", data=b"{}"), 404)
    assert_error(client.post("/webhooks/callingly/nobody?token=bad", data=b"{}"), 404)
    assert_error(client.post("/webhooks/callingly/cronly", data=b"{}"), 404)


def test_order_signature_before_body(client: FlaskClient) -> None:
    for raw in (b"", b"not json", b"[1]", b"\xff"):
        assert_error(client.post("/webhooks/callrail/acme", data=raw,
                                 headers={"Signature": "bad"}), 401)
        assert_error(client.post("/webhooks/callrail/acme?event=bogus", data=raw), 401)
        assert_error(client.post("/webhooks/callingly/acme?token=bad", data=raw), 401)
        assert_error(client.post("/webhooks/callingly/acme?event=bogus", data=raw), 401)


# -- 503 ------------------------------------------------------------------------------------
def test_redis_down_is_503_with_retry_after_then_recovers() -> None:
    server = fakeredis.FakeServer()
    redis_client = fakeredis.FakeRedis(server=server)
    app = build_app(redis_client)
    try:
        with app.test_client() as client:
            server.connected = False
            resp = post_callrail(client, POST_CALL)
            assert_error(resp, 503)
            assert int(resp.headers["Retry-After"]) > 0
            resp = post_callingly(client, {"id": 9, "seconds": 3})
            assert_error(resp, 503)
            assert "Retry-After" in resp.headers
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "Retry-After" in ready.headers
            assert client.get("/healthz").status_code == 200
            # checks that need no Redis still answer as before
            assert_error(post_callrail(client, POST_CALL, key="wrong-key-000"), 401)
            assert_error(post_callrail(client, POST_CALL, tenant="nobody"), 404)

            server.connected = True
            resp = post_callrail(client, POST_CALL)
            assert resp.status_code == 202
            event = store_of(app).get(resp.get_json()["id"])
            assert event is not None and event["body"] == json.dumps(POST_CALL).encode()
            assert redis_client.llen(QUEUE_EVENTS) == 1
            assert client.get("/readyz").status_code == 200
    finally:
        redis_client.close()


def test_redis_down_stores_nothing_half_way() -> None:
    """The store is one script: a 503 leaves neither the event nor a dedup key behind."""
    server = fakeredis.FakeServer()
    redis_client = fakeredis.FakeRedis(server=server)
    app = build_app(redis_client)
    try:
        with app.test_client() as client:
            server.connected = False
            assert post_callrail(client, POST_CALL).status_code == 503
            server.connected = True
            assert_nothing_stored(redis_client)
            # the retry of the same body is a new event, not a "duplicate" of a lost one
            resp = post_callrail(client, POST_CALL)
            assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    finally:
        redis_client.close()


# -- the published CallRail test vector ------------------------------------------------------
@pytest.fixture(scope="module")
def vector_body() -> bytes:
    raw = (FIXTURES / "callrail" / "signature_vector.body").read_bytes()
    assert len(raw) == 2279
    assert not raw.endswith(b"\n")
    assert hashlib.sha256(raw).hexdigest() == VECTOR_SHA256
    return raw


def test_vector_signature_function(vector_body: bytes) -> None:
    assert callrail_signature(VECTOR_KEY, vector_body) == VECTOR_SIGNATURE


@pytest.mark.parametrize("header", ["Signature", "signature", "SIGNATURE", "sIgNaTuRe"])
def test_vector_is_accepted(app: Flask, client: FlaskClient, fake_redis: fakeredis.FakeRedis,
                            vector_body: bytes, header: str) -> None:
    resp = client.post("/webhooks/callrail/vector", data=vector_body,
                       headers={header: VECTOR_SIGNATURE}, content_type="application/json")
    assert resp.status_code == 202
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None
    assert event["body"] == vector_body
    assert event["kind"] == "post_call"
    assert event["call_id"] == "766970532"


def test_vector_with_trailing_newline_or_reserialised_is_refused(
        client: FlaskClient, fake_redis: fakeredis.FakeRedis, vector_body: bytes) -> None:
    for raw in (vector_body + b"\n", json.dumps(json.loads(vector_body)).encode(),
                json.dumps(json.loads(vector_body), separators=(",", ":")).encode()):
        if raw == vector_body:
            continue
        resp = client.post("/webhooks/callrail/vector", data=raw,
                           headers={"Signature": VECTOR_SIGNATURE})
        assert_error(resp, 401)
    assert_nothing_stored(fake_redis)


def test_vector_any_one_byte_change_is_refused(client: FlaskClient,
                                               fake_redis: fakeredis.FakeRedis,
                                               vector_body: bytes) -> None:
    positions = sorted({0, 1, len(vector_body) - 1, *range(0, len(vector_body), 23)})
    for pos in positions:
        for delta in (1, 0x80):
            changed = bytearray(vector_body)
            changed[pos] = (changed[pos] + delta) % 256
            resp = client.post("/webhooks/callrail/vector", data=bytes(changed),
                               headers={"Signature": VECTOR_SIGNATURE})
            assert resp.status_code == 401, (pos, delta)
    for raw in (vector_body[:-1], vector_body[1:], b" " + vector_body):
        resp = client.post("/webhooks/callrail/vector", data=raw,
                           headers={"Signature": VECTOR_SIGNATURE})
        assert resp.status_code == 401
    assert_nothing_stored(fake_redis)


def test_vector_signature_changed_is_refused(client: FlaskClient, vector_body: bytes) -> None:
    for i in range(len(VECTOR_SIGNATURE) - 1):  # the last char before '=' and the '=' itself
        c = VECTOR_SIGNATURE[i]
        bad = VECTOR_SIGNATURE[:i] + ("A" if c != "A" else "B") + VECTOR_SIGNATURE[i + 1:]
        resp = client.post("/webhooks/callrail/vector", data=vector_body,
                           headers={"Signature": bad})
        assert resp.status_code == 401, bad
    hexdigest = "5190076d475f9b71aa2fbab38a51a8cc6cd657ae"
    resp = client.post("/webhooks/callrail/vector", data=vector_body,
                       headers={"Signature": hexdigest})
    assert resp.status_code == 401
    # the signing key must be used as its literal string, not hex-decoded
    decoded = base64.b64encode(
        __import__("hmac").new(bytes.fromhex(VECTOR_KEY), vector_body, "sha1").digest()).decode()
    resp = client.post("/webhooks/callrail/vector", data=vector_body,
                       headers={"Signature": decoded})
    assert resp.status_code == 401


# -- kind detection -------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "kind"), [
    ({"resource_id": "C1", "changes": {"tags": []}}, "call_modified"),
    ({"resource_id": "T1", "content": "hi"}, "text_received"),
    ({"id": 5, "form_data": {"name": "x"}}, "form_submission"),
    ({"resource_id": "C2", "answered": "true"}, "post_call"),
    ({}, "post_call"),
])
def test_callrail_kind_from_shape(app: Flask, client: FlaskClient, body: dict[str, Any],
                                  kind: str) -> None:
    resp = post_callrail(client, body)
    assert resp.status_code == 202
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None and event["kind"] == kind


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "callrail").glob("*.json")))
def test_callrail_fixtures_accepted(app: Flask, client: FlaskClient, fixture: str) -> None:
    raw = (FIXTURES / "callrail" / fixture).read_bytes()
    resp = post_callrail(client, raw)
    assert resp.status_code == 202
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw
    body = json.loads(raw)
    if "changes" in body:
        assert event["kind"] == "call_modified"
    elif "form_data" in body:
        assert event["kind"] == "form_submission"


@pytest.mark.parametrize("event", sorted(CALLRAIL_KINDS))
def test_callrail_event_param_wins_over_shape(app: Flask, client: FlaskClient,
                                              event: str) -> None:
    # this body's shape says "call modified"; the query value decides
    resp = post_callrail(client, {"resource_id": "C9", "changes": {}, "content": "x"},
                         query=f"?event={event}")
    assert resp.status_code == 202
    stored = store_of(app).get(resp.get_json()["id"])
    assert stored is not None and stored["kind"] == event


def test_same_body_different_kind_is_not_a_duplicate(client: FlaskClient) -> None:
    first = post_callrail(client, POST_CALL, query="?event=post_call")
    second = post_callrail(client, POST_CALL, query="?event=call_modified")
    assert (first.status_code, second.status_code) == (202, 202)


@pytest.mark.parametrize(("fixture", "event", "kind"), [
    ("lead_created.json", None, "lead_created"),
    ("lead_updated.json", None, "lead_updated"),
    ("lead_created.json", "lead_created", "lead_created"),
    ("call_completed.json", "lead_updated", "lead_updated"),
])
def test_callingly_lead_events_are_skipped_and_not_kept(
        app: Flask, client: FlaskClient, fake_redis: fakeredis.FakeRedis, fixture: str,
        event: str | None, kind: str) -> None:
    raw = (FIXTURES / "callingly" / fixture).read_bytes()
    resp = post_callingly(client, raw, event=event)
    assert resp.status_code == 202
    data = resp.get_json()
    assert data["status"] == "skipped"
    stored = store_of(app).get(data["id"])
    assert stored is not None
    assert stored["kind"] == kind
    assert stored["status"] == "skipped"
    assert "body" not in stored
    assert fake_redis.llen(QUEUE_EVENTS) == 0
    assert fake_redis.zcard("rb:pending") == 0
    # nothing of the body anywhere in Redis
    for key in fake_redis.keys("*"):
        if fake_redis.type(key) == b"hash":
            values = b" ".join(v for v in fake_redis.hvals(key) if isinstance(v, bytes))
            assert b"marcus" not in values.lower()
            assert raw not in values


@pytest.mark.parametrize("event", ["call_completed", None])
def test_callingly_call_completed(app: Flask, client: FlaskClient, event: str | None) -> None:
    raw = (FIXTURES / "callingly" / "call_completed.json").read_bytes()
    resp = post_callingly(client, raw, event=event)
    assert resp.status_code == 202
    stored = store_of(app).get(resp.get_json()["id"])
    assert stored is not None and stored["kind"] == "call_completed"


@pytest.mark.parametrize("call_id", ["CAL\\ud800x", "\\udfff", "a\\ud83d", "\\u0000\\ud800"])
def test_ids_with_lone_surrogates_are_stored_not_500(app: Flask, client: FlaskClient,
                                                     call_id: str) -> None:
    """Valid JSON escapes that are not valid UTF-8 must not lose a signed event."""
    raw = b'{"resource_id": "' + call_id.encode() + b'", "duration": "3"}'
    json.loads(raw)  # valid JSON
    resp = post_callrail(client, raw)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    event = store_of(app).get(resp.get_json()["id"])
    assert event is not None and event["body"] == raw and event["call_id"]
    raw = b'{"id": "' + call_id.encode() + b'", "seconds": 3}'
    resp = post_callingly(client, raw)
    assert resp.status_code == 202, resp.get_data(as_text=True)


# -- secrets and logs -----------------------------------------------------------------------
def _record_text(rec: logging.LogRecord) -> str:
    return rec.getMessage() + " " + " ".join(f"{k}={v!r}" for k, v in vars(rec).items())


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
    ]
    statuses = [r.status_code for r in requests_made]
    assert statuses == [202, 401, 400, 400, 404, 404, 202, 401, 400, 400, 413]
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
    resp = post_callrail(client, POST_CALL, query="?event=post_call")
    assert resp.status_code == 202
    (rec,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert rec.path == "/webhooks/callrail/acme"  # type: ignore[attr-defined]
    assert rec.status == 202  # type: ignore[attr-defined]
    assert rec.tenant == "acme"  # type: ignore[attr-defined]
    assert rec.source == "callrail"  # type: ignore[attr-defined]
    assert rec.kind == "post_call"  # type: ignore[attr-defined]
    assert rec.event_id == resp.get_json()["id"]  # type: ignore[attr-defined]


def test_unexpected_error_is_a_json_500_logged_and_counted(
        app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door answers webhooks without Flask; a bug there must still be a JSON 500
    with the error logged (Sentry's logging integration reports it) and a request line."""
    def broken(**kw: Any) -> Any:
        raise RuntimeError("bug")
    monkeypatch.setattr(store_of(app), "intake", broken)
    caplog.set_level(logging.INFO)
    resp = post_callrail(client, POST_CALL)
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal error"}
    assert resp.headers["Content-Type"] == "application/json"
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    (line,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert line.status == 500  # type: ignore[attr-defined]


def test_flask_routes_answer_like_the_front_door(app: Flask) -> None:
    """The webhook routes stay registered in Flask (405 on GET, same answers): the front door
    is a shortcut past Flask's request machinery, not a second implementation."""
    from werkzeug.test import Client

    front = app.test_client()
    inner = Client(app.wsgi_app.wsgi_app)  # type: ignore[attr-defined]  # Flask without it
    raw = json.dumps(POST_CALL).encode()
    cases = [
        ("/webhooks/callrail/acme", raw, {"Signature": callrail_signature(ACME_KEY, raw)}),
        ("/webhooks/callrail/acme", raw, {"Signature": "bad"}),
        ("/webhooks/callrail/nobody", raw, {}),
        (f"/webhooks/callingly/acme?token={ACME_TOKEN}", b"[]", {}),
        ("/webhooks/callrail/acme", b"x" * (MIB + 1), {}),
    ]
    for url, body, headers in cases:
        a = front.post(url, data=body, headers=headers)
        b = inner.post(url, data=body, headers=headers)
        assert a.headers["Content-Type"] == b.headers["Content-Type"] == "application/json"
        if a.status_code == 202:   # the second is the same body again: a duplicate
            assert b.status_code == 200
            assert b.get_json() == {"id": a.get_json()["id"], "status": "duplicate"}
        else:
            assert a.status_code == b.status_code
            assert a.get_json() == b.get_json()
            assert a.headers.get("Connection") == b.headers.get("Connection")
    for path in ("/webhooks/callrail/acme", "/webhooks/callingly/acme"):
        resp = front.get(path)
        assert resp.status_code == 405 and resp.get_json()["error"]


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
_events = st.one_of(st.none(), st.sampled_from(sorted(CALLRAIL_KINDS | CALLINGLY_KINDS)),
                    st.text(max_size=20))
_header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "host"})
_header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
_headers = st.dictionaries(_header_names, _header_values, max_size=4)
_query = st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3)


def _fuzz_client() -> tuple[fakeredis.FakeRedis, FlaskClient]:
    redis_client = fakeredis.FakeRedis()
    return redis_client, build_app(redis_client).test_client()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(["callrail", "callingly"]), tenant=_tenants, body=_bodies,
       headers=_headers, query=_query, event=_events,
       auth=st.sampled_from(["good", "bad", "none"]), content_type=st.none() | _header_values)
def test_fuzz_intake_never_5xx_and_rejections_store_nothing(
        source: str, tenant: str, body: bytes, headers: dict[str, str], query: dict[str, str],
        event: str | None, auth: str, content_type: str | None) -> None:
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
        resp = client.post(url, data=body, headers=headers, query_string=params,
                           content_type=content_type)
        assert resp.status_code < 500, resp.get_data(as_text=True)
        text = resp.get_data(as_text=True)
        for secret in SECRETS:
            assert secret not in text
        if resp.status_code in (200, 202):
            data = resp.get_json()
            assert data["status"] in ("queued", "skipped", "duplicate")
            stored = EventStore(redis_client, dedup_window=60, retention=60).get(data["id"])
            assert stored is not None and stored["tenant"] == tenant
            assert stored["source"] == source
            if data["status"] == "queued":
                assert stored["body"] == body
                assert redis_client.llen(QUEUE_EVENTS) == 1
        else:
            assert resp.status_code in (400, 401, 404, 405, 413)
            assert resp.get_json()["error"]
            assert redis_client.keys("*") == []
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
        assert redis_client.keys("rb:*") == []
    finally:
        redis_client.close()


def test_metrics_show_events_waiting_for_a_tenant_slot(client: FlaskClient,
                                                       fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.zadd("rb:capwait:acme", {"ev_a": 1.0, "ev_b": 2.0})
    fake_redis.hset("rb:capwait:acme:msg", "ev_a", "{}")   # the messages hash is not counted
    resp = client.get("/metrics")
    assert resp.status_code == 200
    lines = resp.get_data(as_text=True).splitlines()
    assert 'rilla_bridge_waiting_for_slot{tenant="acme"} 2.0' in lines
    assert 'rilla_bridge_waiting_for_slot{tenant="vector"} 0.0' in lines
    assert "rilla_bridge_redis_up 1.0" in lines


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
