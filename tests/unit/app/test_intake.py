"""The webhook handler (SPEC "Webhook intake"): ``app.intake.Intake.handle`` called directly,
Redis faked, time from the test's clock. What the WSGI front door adds (reading the body, the
size limit, 405, logging) is in ``test_door.py``."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fakeredis
import pytest
import redis

from app.intake import Intake, Reply, WebhookRequest
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, TASK_PROCESS_EVENT, message_args
from rilla_bridge.clock import FakeClock
from rilla_bridge.events import EventStore
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import dedup_digest, make_lifecycle
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

POST_CALL = {"resource_id": "CAL123", "customer_name": "Pat Doe", "duration": "42"}
CALL_COMPLETED = (FIXTURES / "callingly" / "call_completed.json").read_bytes()


def make_intake(client: Any, clock: FakeClock, settings: Settings | None = None) -> Intake:
    tenants, settings = parse_tenants(TENANTS, env={}), settings or Settings()
    return Intake(tenants, make_lifecycle(client, clock, settings, tenants), settings)


def received(client: Any) -> list[Record]:
    """The ``received`` history records intake appended, oldest first."""
    return [r for r in (Record.from_entry(sid, f) for sid, f in client.xrange(keys.HISTORY))
            if r.type == "received"]


@pytest.fixture
def intake(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Intake:
    return make_intake(fake_redis, clock)


@pytest.fixture
def store(fake_redis: fakeredis.FakeRedis) -> EventStore:
    return EventStore(fake_redis)


def _raw(body: bytes | dict[str, Any]) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def post_callrail(intake: Intake, body: bytes | dict[str, Any], tenant: str = "acme",
                  key: str | None = ACME_KEY, event: str | None = None,
                  signature: str | None = None) -> Reply:
    """A CallRail webhook signed with ``key`` (or carrying ``signature`` as given)."""
    raw = _raw(body)
    if signature is None and key is not None:
        signature = callrail_signature(key, raw)
    query = {"event": [event]} if event is not None else {}
    return intake.handle(WebhookRequest("callrail", tenant, raw, query, signature))


def post_callingly(intake: Intake, body: bytes | dict[str, Any], tenant: str = "acme",
                   token: str | None = ACME_TOKEN, event: str | None = None) -> Reply:
    query: dict[str, list[str]] = {}
    if token is not None:
        query["token"] = [token]
    if event is not None:
        query["event"] = [event]
    return intake.handle(WebhookRequest("callingly", tenant, _raw(body), query))


def answer(reply: Reply) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(reply.body)
    return data


def assert_nothing_stored(client: Any) -> None:
    assert client.keys("rb:*") == []
    assert client.llen(QUEUE_EVENTS) == 0


def assert_only_counted(client: Any, tenant: str = "acme") -> None:
    """Refused after the intake limit (a bad body, an unknown ``?event=``): nothing stored,
    but the webhook counted against its tenant's limit."""
    assert client.keys("*") == [keys.intake_limit(tenant).encode()]
    assert client.hget(keys.intake_limit(tenant), "e") is not None


def assert_error(reply: Reply, code: int) -> dict[str, Any]:
    assert reply.status == code, reply.body
    data = answer(reply)
    assert set(data) == {"error"} and isinstance(data["error"], str) and data["error"]
    text = reply.body.decode()
    for secret in SECRETS:
        assert secret not in text
    assert reply.event_id is None
    return data


# -- 202 / 200 ------------------------------------------------------------------------------
def test_callrail_accepted_is_stored_and_queued(intake: Intake, store: EventStore,
                                                fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    raw = json.dumps(POST_CALL).encode()
    reply = post_callrail(intake, raw)
    assert reply.status == 202 and reply.headers == ()
    data = answer(reply)
    assert set(data) == {"id", "status"}
    assert data["status"] == "queued"
    # what the request log line may say
    assert (reply.tenant, reply.kind, reply.event_id) == ("acme", "post_call", data["id"])
    # the id is time-ordered by the clock: "ev_" + milliseconds in hex + 64 random bits
    assert data["id"].startswith(f"ev_{int(clock.now() * 1000):012x}")
    assert len(data["id"]) == 3 + 12 + 16
    event = store.get(data["id"])
    assert event is not None
    assert event["id"] == data["id"]
    assert event["tenant"] == "acme"
    assert event["source"] == "callrail"
    assert event["kind"] == "post_call"
    assert event["call_id"] == "CAL123"
    assert event["body"] == raw
    assert event["status"] == "queued"
    assert float(event["received_at"]) == clock.now()
    # Its history record, with the raw body, written in the same step.
    (rec,) = received(fake_redis)
    assert rec.body == raw
    assert (rec.data["id"], rec.data["size"], rec.data["sha256"], rec.data["kept"]) == (
        data["id"], len(raw), hashlib.sha256(raw).hexdigest(), True)
    # The tenant has a slot free: dispatched at once (its slot taken, its message queued).
    messages = fake_redis.lrange(QUEUE_EVENTS, 0, -1)
    assert len(messages) == 1
    msg = json.loads(messages[0])
    assert msg["headers"]["task"] == TASK_PROCESS_EVENT
    assert json.loads(msg["body"])[0] == [data["id"], "acme"]
    assert message_args(messages[0]) == [data["id"], "acme"]
    assert fake_redis.zscore(keys.inflight("acme"), data["id"]) is not None
    assert fake_redis.zscore(keys.open_events("acme"), data["id"]) == clock.now()


def test_the_dedup_key_expires_and_the_event_stays_until_finished(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = make_intake(fake_redis, clock, Settings(dedup_window_seconds=600))
    raw = json.dumps(POST_CALL).encode()
    event_id = answer(post_callrail(intake, raw))["id"]
    dedup = keys.dedup(dedup_digest("callrail", "acme", raw))
    assert fake_redis.get(dedup) == event_id.encode()
    assert fake_redis.ttl(dedup) == 600
    assert fake_redis.ttl(keys.event(event_id)) == -1      # no expiry: a worker finishes it


def test_callingly_accepted_is_stored_and_queued(intake: Intake, store: EventStore,
                                                 fake_redis: fakeredis.FakeRedis) -> None:
    reply = post_callingly(intake, CALL_COMPLETED)
    assert reply.status == 202
    data = answer(reply)
    assert data["status"] == "queued"
    assert (reply.tenant, reply.kind, reply.event_id) == ("acme", "call_completed", data["id"])
    event = store.get(data["id"])
    assert event is not None
    assert (event["tenant"], event["source"], event["kind"]) == ("acme", "callingly",
                                                                  "call_completed")
    assert event["call_id"] == str(json.loads(CALL_COMPLETED)["id"])
    assert event["body"] == CALL_COMPLETED
    assert fake_redis.llen(QUEUE_EVENTS) == 1


def test_identical_body_is_a_duplicate_with_the_same_id(intake: Intake,
                                                        fake_redis: fakeredis.FakeRedis,
                                                        clock: FakeClock) -> None:
    first = post_callrail(intake, POST_CALL)
    clock.advance(30)
    second = post_callrail(intake, POST_CALL)
    assert first.status == 202
    assert second.status == 200
    assert answer(second) == {"id": answer(first)["id"], "status": "duplicate"}
    assert second.event_id == first.event_id and second.kind == "post_call"
    assert fake_redis.llen(QUEUE_EVENTS) == 1
    assert len(fake_redis.keys("rb:ev:*")) == 1 and len(received(fake_redis)) == 1
    # a different body is a new event
    third = post_callrail(intake, {**POST_CALL, "duration": "43"})
    assert third.status == 202
    assert answer(third)["id"] != answer(first)["id"]


def test_callingly_duplicate(intake: Intake) -> None:
    first = post_callingly(intake, CALL_COMPLETED)
    second = post_callingly(intake, CALL_COMPLETED)
    assert (first.status, second.status) == (202, 200)
    assert answer(second) == {"id": answer(first)["id"], "status": "duplicate"}


def test_same_body_with_another_event_param_is_still_a_duplicate(
        intake: Intake, fake_redis: fakeredis.FakeRedis) -> None:
    """``?event=`` is not signed: a captured body replayed under another kind is a repeat."""
    first = post_callrail(intake, POST_CALL, event="post_call")
    second = post_callrail(intake, POST_CALL, event="call_modified")
    assert (first.status, second.status) == (202, 200)
    assert answer(second) == {"id": answer(first)["id"], "status": "duplicate"}
    assert len(received(fake_redis)) == 1 and fake_redis.llen(QUEUE_EVENTS) == 1


def test_same_body_for_another_tenant_is_not_a_duplicate(intake: Intake) -> None:
    raw = json.dumps(POST_CALL).encode()
    first = post_callrail(intake, raw, tenant="acme")
    second = post_callrail(intake, raw, tenant="cronly", key="cronly-signing-key-03")
    assert (first.status, second.status) == (202, 202)


# -- 401 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("signature", [
    None, "", "   ", "not-base64", callrail_signature("wrong-key-0000000", b"{}"),
    callrail_signature(ACME_KEY, b"{}").lower(),
])
def test_callrail_bad_or_missing_signature(fake_redis: fakeredis.FakeRedis, clock: FakeClock,
                                           signature: str | None) -> None:
    intake = make_intake(fake_redis, clock)
    raw = json.dumps(POST_CALL).encode()
    reply = intake.handle(WebhookRequest("callrail", "acme", raw, {}, signature))
    assert_error(reply, 401)
    assert reply.tenant == "acme" and reply.kind is None
    assert_nothing_stored(fake_redis)


def test_callrail_signature_of_another_tenant_is_refused(intake: Intake,
                                                         fake_redis: fakeredis.FakeRedis) -> None:
    assert_error(post_callrail(intake, POST_CALL, tenant="acme", key="cronly-signing-key-03"),
                 401)
    assert_nothing_stored(fake_redis)


@pytest.mark.parametrize("token", [None, "", "wrong", ACME_TOKEN + "x", ACME_TOKEN[:-1],
                                   "cgonly-callingly-token-04", ACME_TOKEN.upper()])
def test_callingly_bad_or_missing_token(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                        token: str | None) -> None:
    reply = post_callingly(intake, {"id": 1, "seconds": 3}, token=token)
    assert_error(reply, 401)
    assert reply.tenant == "acme"
    assert_nothing_stored(fake_redis)


def test_callingly_only_the_first_token_counts(intake: Intake) -> None:
    query = {"token": ["wrong", ACME_TOKEN]}
    reply = intake.handle(WebhookRequest("callingly", "acme", CALL_COMPLETED, query))
    assert_error(reply, 401)
    query = {"token": [ACME_TOKEN, "wrong"]}
    assert intake.handle(WebhookRequest("callingly", "acme", CALL_COMPLETED, query)).status == 202


# -- 404 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "tenant", "known"), [
    ("callrail", "nobody", False), ("callingly", "nobody", False),
    ("callrail", "ACME", False), ("callrail", "acme ", False), ("callrail", "", False),
    ("callrail", "cgonly", True), ("callrail", "bare", True),
    ("callingly", "cronly", True), ("callingly", "bare", True), ("callingly", "vector", True),
])
def test_unknown_tenant_or_missing_section(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                           source: str, tenant: str, known: bool) -> None:
    raw = json.dumps(POST_CALL).encode()
    reply = intake.handle(WebhookRequest(source, tenant, raw, {"token": [ACME_TOKEN]},
                                         callrail_signature(ACME_KEY, raw)))
    data = assert_error(reply, 404)
    # the log line names a tenant only once it is known to exist
    assert reply.tenant == (tenant if known else None)
    if known:
        assert ("CallRail" if source == "callrail" else "Callingly") in data["error"]
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
def test_callrail_bad_body(intake: Intake, fake_redis: fakeredis.FakeRedis, raw: bytes) -> None:
    reply = post_callrail(intake, raw)
    assert_error(reply, 400)
    assert reply.tenant == "acme"
    assert_only_counted(fake_redis)


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_callingly_bad_body(intake: Intake, fake_redis: fakeredis.FakeRedis, raw: bytes) -> None:
    assert_error(post_callingly(intake, raw), 400)
    assert_only_counted(fake_redis)


@pytest.mark.parametrize("raw", [b'{"resource_id": "CAL1", "duration": NaN}',
                                 b'{"resource_id": "CAL1", "duration": Infinity}',
                                 b'{"resource_id": "CAL1", "value": -Infinity}'])
def test_nan_and_infinity_are_a_bad_body(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                         raw: bytes) -> None:
    assert assert_error(post_callrail(intake, raw), 400) == {"error": "body is not valid JSON"}
    assert_only_counted(fake_redis)


def test_a_leading_byte_order_mark_is_accepted(intake: Intake, store: EventStore) -> None:
    raw = b"\xef\xbb\xbf" + json.dumps(POST_CALL).encode()
    reply = post_callrail(intake, raw)              # signed over the bytes sent, mark included
    assert reply.status == 202 and reply.kind == "post_call"
    event = store.get(answer(reply)["id"])
    assert event is not None and event["body"] == raw and event["call_id"] == "CAL123"
    reply = post_callingly(intake, b"\xef\xbb\xbf" + CALL_COMPLETED)
    assert reply.status == 202 and reply.kind == "call_completed"


def test_a_huge_number_is_a_missing_field_not_a_bad_body(intake: Intake,
                                                         store: EventStore) -> None:
    raw = b'{"resource_id": "CAL123", "duration": ' + b"9" * 5000 + b"}"
    reply = post_callrail(intake, raw)
    assert reply.status == 202, reply.body
    event = store.get(answer(reply)["id"])
    assert event is not None and event["body"] == raw and event["call_id"] == "CAL123"


@pytest.mark.parametrize("event", ["", "post-call", "POST_CALL", "call_completed", "nope",
                                   "post_call ", "x" * 5000])
def test_callrail_unknown_event_param(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                      event: str) -> None:
    data = assert_error(post_callrail(intake, POST_CALL, event=event), 400)
    assert len(data["error"]) < 1000
    assert_only_counted(fake_redis)


@pytest.mark.parametrize("event", ["", "post_call", "lead", "CALL_COMPLETED"])
def test_callingly_unknown_event_param(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                       event: str) -> None:
    assert_error(post_callingly(intake, {"id": 1, "seconds": 5}, event=event), 400)
    assert_only_counted(fake_redis)


# -- 429: the tenant's intake limit --------------------------------------------------------------
def limited(fake_redis: fakeredis.FakeRedis, clock: FakeClock, tenants_toml: str = TENANTS,
            **settings: Any) -> Intake:
    tenants, s = parse_tenants(tenants_toml, env={}), Settings(**settings)
    return Intake(tenants, make_lifecycle(fake_redis, clock, s, tenants), s)


def assert_limited(reply: Reply, wait: int) -> None:
    assert_error(reply, 429)
    assert reply.headers == (("Retry-After", str(wait)),)
    assert reply.tenant == "acme" and reply.kind is None


def test_over_the_events_per_second_limit_is_429_and_stores_nothing(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = limited(fake_redis, clock, tenant_intake_per_second=1)
    # One event a second, with two seconds of burst.
    assert [post_callrail(intake, {**POST_CALL, "n": n}).status for n in (1, 2)] == [202, 202]
    reply = post_callrail(intake, {**POST_CALL, "n": 3})
    assert_limited(reply, 1)
    assert len(received(fake_redis)) == 2 and fake_redis.zcard(keys.open_events("acme")) == 2
    # The limit is the tenant's own: another tenant is not slowed down.
    assert post_callrail(intake, POST_CALL, tenant="cronly",
                         key="cronly-signing-key-03").status == 202
    clock.advance(1)
    assert post_callrail(intake, {**POST_CALL, "n": 3}).status == 202
    assert len(received(fake_redis)) == 4


def test_over_the_bytes_per_minute_limit_is_429(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    # 0.001 MiB a minute: 1,048.576 bytes of burst, refilled at 17.476 bytes a second.
    intake = limited(fake_redis, clock, tenant_intake_mib_per_minute=0.001)
    body = {**POST_CALL, "pad": "x" * 518}
    raw = json.dumps(body).encode()
    assert len(raw) == 600
    assert post_callrail(intake, raw).status == 202                       # 448.6 bytes left
    assert_limited(post_callrail(intake, {**body, "pad": "y" * 518}), 9)  # (600 - 448.6) / 17.5
    assert post_callrail(intake, {"resource_id": "CAL9"}).status == 202   # 23 bytes still fit
    clock.advance(9)                                                      # 425.6 + 157.3
    assert_limited(post_callrail(intake, {**body, "pad": "y" * 518}), 1)
    clock.advance(1)
    assert post_callrail(intake, {**body, "pad": "y" * 518}).status == 202


def test_a_body_larger_than_a_minutes_allowance_needs_all_of_it(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = limited(fake_redis, clock, tenant_intake_mib_per_minute=0.001)
    big = {**POST_CALL, "pad": "x" * 5000}
    assert post_callrail(intake, big).status == 202          # the whole allowance, not refused
    assert_limited(post_callrail(intake, {**big, "n": 2}), 60)


def test_the_tenants_own_limit_wins_over_the_settings(fake_redis: fakeredis.FakeRedis,
                                                      clock: FakeClock) -> None:
    own = TENANTS.replace('[tenants.acme.callrail]',
                          'intake_per_second = 0.5\n[tenants.acme.callrail]')
    intake = limited(fake_redis, clock, own, tenant_intake_per_second=1000)
    assert post_callrail(intake, {**POST_CALL, "n": 1}).status == 202     # a burst of one
    assert_limited(post_callrail(intake, {**POST_CALL, "n": 2}), 2)
    for n in range(3, 8):                                    # the others keep the default
        assert post_callrail(intake, {**POST_CALL, "n": n}, tenant="cronly",
                             key="cronly-signing-key-03").status == 202


def test_bad_bodies_count_against_the_limit_and_429_comes_before_400(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = limited(fake_redis, clock, tenant_intake_per_second=1)
    assert_error(post_callrail(intake, b"not json"), 400)
    assert_error(post_callrail(intake, POST_CALL, event="bogus"), 400)
    assert_limited(post_callrail(intake, b"not json"), 1)       # the limit, then the body
    assert_limited(post_callrail(intake, POST_CALL), 1)         # a good one waits too
    assert_only_counted(fake_redis)


def test_refused_signatures_and_unknown_tenants_do_not_count(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = limited(fake_redis, clock, tenant_intake_per_second=1)
    for _ in range(5):
        assert_error(post_callrail(intake, POST_CALL, key="wrong-key-0000000"), 401)
        assert_error(post_callingly(intake, CALL_COMPLETED, token="wrong"), 401)
        assert_error(post_callrail(intake, POST_CALL, tenant="nobody"), 404)
    assert_nothing_stored(fake_redis)
    assert [post_callrail(intake, {**POST_CALL, "n": n}).status for n in (1, 2)] == [202, 202]


def test_the_default_limit_is_200_a_second(fake_redis: fakeredis.FakeRedis,
                                           clock: FakeClock) -> None:
    intake = limited(fake_redis, clock)
    assert all(post_callrail(intake, {**POST_CALL, "n": n}).status == 202 for n in range(400))
    assert_limited(post_callrail(intake, {**POST_CALL, "n": 400}), 1)


# -- order (size comes first, at the door: test_door.py) ---------------------------------------
def test_order_tenant_before_signature(intake: Intake) -> None:
    assert_error(post_callrail(intake, b"{}", tenant="nobody", signature="bad"), 404)
    assert_error(post_callrail(intake, b"{}", tenant="cgonly", key=None), 404)
    assert_error(post_callingly(intake, b"{}", tenant="nobody", token="bad"), 404)
    assert_error(post_callingly(intake, b"{}", tenant="cronly", token=None), 404)


def test_order_signature_before_body(intake: Intake) -> None:
    for raw in (b"", b"not json", b"[1]", b"\xff"):
        assert_error(post_callrail(intake, raw, signature="bad"), 401)
        assert_error(post_callrail(intake, raw, key=None, event="bogus"), 401)
        assert_error(post_callingly(intake, raw, token="bad"), 401)
        assert_error(post_callingly(intake, raw, token=None, event="bogus"), 401)


def test_order_event_param_before_body(intake: Intake) -> None:
    data = assert_error(post_callrail(intake, b"not json", event="bogus"), 400)
    assert "bogus" in data["error"]


# -- 503 ------------------------------------------------------------------------------------
def test_redis_down_is_503_with_retry_after_then_recovers(clock: FakeClock) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    intake = make_intake(client, clock)
    try:
        server.connected = False
        reply = post_callrail(intake, POST_CALL)
        assert_error(reply, 503)
        assert ("Retry-After", "5") in reply.headers
        assert (reply.tenant, reply.kind) == ("acme", None)    # nothing was stored as a kind
        reply = post_callingly(intake, {"id": 9, "seconds": 3})
        assert_error(reply, 503)
        assert dict(reply.headers)["Retry-After"] == "5" and reply.kind is None
        # checks before the intake limit need no Redis and answer as before...
        assert_error(post_callrail(intake, POST_CALL, key="wrong-key-000"), 401)
        assert_error(post_callrail(intake, POST_CALL, tenant="nobody"), 404)
        # ...the limit (and so a bad body, which counts against it) needs Redis
        reply = post_callrail(intake, b"[]")
        assert_error(reply, 503)
        assert dict(reply.headers)["Retry-After"] == "5"

        server.connected = True
        reply = post_callrail(intake, POST_CALL)
        assert reply.status == 202
        event = EventStore(client).get(answer(reply)["id"])
        assert event is not None and event["body"] == json.dumps(POST_CALL).encode()
        assert client.llen(QUEUE_EVENTS) == 1
    finally:
        client.close()


def test_redis_down_stores_nothing_half_way(clock: FakeClock) -> None:
    """The store is one script: a 503 leaves neither the event nor a dedup key behind."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    intake = make_intake(client, clock)
    try:
        server.connected = False
        assert post_callrail(intake, POST_CALL).status == 503
        server.connected = True
        assert_nothing_stored(client)
        # the retry of the same body is a new event, not a "duplicate" of a lost one
        reply = post_callrail(intake, POST_CALL)
        assert reply.status == 202 and answer(reply)["status"] == "queued"
    finally:
        client.close()


# -- the published CallRail test vector ------------------------------------------------------
@pytest.fixture(scope="module")
def vector_body() -> bytes:
    raw = (FIXTURES / "callrail" / "signature_vector.body").read_bytes()
    assert callrail_signature(VECTOR_KEY, raw) == VECTOR_SIGNATURE
    return raw


@pytest.mark.parametrize("header", [VECTOR_SIGNATURE, f" {VECTOR_SIGNATURE}\t"])
def test_vector_is_accepted(intake: Intake, store: EventStore, vector_body: bytes,
                            header: str) -> None:
    reply = intake.handle(WebhookRequest("callrail", "vector", vector_body, {}, header))
    assert reply.status == 202
    event = store.get(answer(reply)["id"])
    assert event is not None
    assert event["body"] == vector_body
    assert event["kind"] == "post_call"
    assert event["call_id"] == "766970532"


def test_vector_with_trailing_newline_or_reserialised_is_refused(
        intake: Intake, fake_redis: fakeredis.FakeRedis, vector_body: bytes) -> None:
    for raw in (vector_body + b"\n", json.dumps(json.loads(vector_body)).encode(),
                json.dumps(json.loads(vector_body), separators=(",", ":")).encode()):
        if raw == vector_body:   # CallRail's own serialisation: compact
            continue
        reply = intake.handle(WebhookRequest("callrail", "vector", raw, {}, VECTOR_SIGNATURE))
        assert_error(reply, 401)
    assert_nothing_stored(fake_redis)


def test_vector_any_one_byte_change_is_refused(intake: Intake, fake_redis: fakeredis.FakeRedis,
                                               vector_body: bytes) -> None:
    positions = sorted({0, 1, len(vector_body) - 1, *range(0, len(vector_body), 23)})
    for pos in positions:
        for delta in (1, 0x80):
            changed = bytearray(vector_body)
            changed[pos] = (changed[pos] + delta) % 256
            reply = intake.handle(WebhookRequest("callrail", "vector", bytes(changed), {},
                                                 VECTOR_SIGNATURE))
            assert reply.status == 401, (pos, delta)
    for raw in (vector_body[:-1], vector_body[1:], b" " + vector_body):
        reply = intake.handle(WebhookRequest("callrail", "vector", raw, {}, VECTOR_SIGNATURE))
        assert reply.status == 401
    assert_nothing_stored(fake_redis)


# -- kinds ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "kind"), [
    ({"resource_id": "C1", "changes": {"tags": []}}, "call_modified"),
    ({"resource_id": "T1", "content": "hi"}, "text_received"),
    ({"resource_id": "T2", "content": "hi", "agent": {"id": 3}}, "text_sent"),
    ({"id": 5, "form_data": {"name": "x"}}, "form_submission"),
    ({"resource_id": "C2", "answered": "true"}, "post_call"),
    ({}, "post_call"),
])
def test_callrail_kind_from_shape(intake: Intake, store: EventStore, body: dict[str, Any],
                                  kind: str) -> None:
    reply = post_callrail(intake, body)
    assert reply.status == 202 and reply.kind == kind
    event = store.get(answer(reply)["id"])
    assert event is not None and event["kind"] == kind


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "callrail").glob("*.json")))
def test_callrail_fixtures_accepted(intake: Intake, store: EventStore, fixture: str) -> None:
    raw = (FIXTURES / "callrail" / fixture).read_bytes()
    reply = post_callrail(intake, raw)
    assert reply.status == 202
    event = store.get(answer(reply)["id"])
    assert event is not None and event["body"] == raw
    body = json.loads(raw)
    assert event["kind"] == callrail.detect_kind(body)
    if "changes" in body:
        assert event["kind"] == "call_modified"
    elif "form_data" in body:
        assert event["kind"] == "form_submission"


@pytest.mark.parametrize("event", sorted(callrail.KINDS))
def test_callrail_event_param_wins_over_shape(intake: Intake, store: EventStore,
                                              event: str) -> None:
    # this body's shape says "call modified"; the query value decides
    reply = post_callrail(intake, {"resource_id": "C9", "changes": {}, "content": "x"},
                          event=event)
    assert reply.status == 202
    stored = store.get(answer(reply)["id"])
    assert stored is not None and stored["kind"] == event


@pytest.mark.parametrize(("fixture", "event", "kind"), [
    ("lead_created.json", None, "lead_created"),
    ("lead_updated.json", None, "lead_updated"),
    ("lead_created.json", "lead_created", "lead_created"),
    ("call_completed.json", "lead_updated", "lead_updated"),
    # a lead body is a lead, whatever the unsigned ?event= claims
    ("lead_created.json", "call_completed", "lead_created"),
    ("lead_updated.json", "call_completed", "lead_updated"),
])
def test_callingly_lead_events_are_skipped_and_not_kept(
        intake: Intake, store: EventStore, fake_redis: fakeredis.FakeRedis, fixture: str,
        event: str | None, kind: str) -> None:
    raw = (FIXTURES / "callingly" / fixture).read_bytes()
    reply = post_callingly(intake, raw, event=event)
    assert reply.status == 202
    data = answer(reply)
    assert data["status"] == "skipped"
    assert kind in callingly.UNKEPT_KINDS
    # Finished at once: only its history record, without the body.
    assert store.get(data["id"]) is None
    (rec,) = received(fake_redis)
    assert rec.body is None
    assert rec.data["id"] == data["id"]
    assert (rec.data["kind"], rec.data["status"], rec.data["kept"]) == (kind, "skipped", False)
    assert rec.data["call_id"] is None          # a lead is not a call
    assert rec.data["note"] == "Callingly lead event: acknowledged, body not kept"
    assert rec.data["sha256"] == hashlib.sha256(raw).hexdigest()
    assert fake_redis.llen(QUEUE_EVENTS) == 0
    assert fake_redis.zcard(keys.open_events("acme")) == 0
    assert fake_redis.llen(keys.lane("acme")) == 0
    # nothing of the body anywhere in Redis
    for key in fake_redis.keys("*"):
        kind_of_key = fake_redis.type(key)
        if kind_of_key == b"hash":
            values = b" ".join(v for v in fake_redis.hvals(key) if isinstance(v, bytes))
        elif kind_of_key == b"stream":
            entries: Any = fake_redis.xrange(key)
            values = b" ".join(v for _, f in entries for v in f.values())
        else:
            continue
        assert b"marcus" not in values.lower()
        assert raw not in values
    # the same lead event again is a duplicate of the first
    again = post_callingly(intake, raw, event=event)
    assert (again.status, answer(again)) == (200, {"id": data["id"], "status": "duplicate"})


@pytest.mark.parametrize("secret", [{"two_factor_secret": "JBSWY3DPEHPK3PXP"},
                                    {"user": {"openai_key": "sk-proj-0000"}}])
def test_a_call_body_carrying_a_leads_secrets_is_not_kept(
        intake: Intake, store: EventStore, fake_redis: fakeredis.FakeRedis,
        secret: dict[str, Any]) -> None:
    raw = json.dumps({**json.loads(CALL_COMPLETED), **secret}).encode()
    reply = post_callingly(intake, raw, event="call_completed")
    assert reply.status == 202 and answer(reply)["status"] == "skipped"
    assert reply.kind == "lead_updated"
    (rec,) = received(fake_redis)
    assert rec.body is None and rec.data["kept"] is False
    assert store.get(answer(reply)["id"]) is None and fake_redis.llen(QUEUE_EVENTS) == 0


@pytest.mark.parametrize("event", ["call_completed", None])
def test_callingly_call_completed(intake: Intake, store: EventStore, event: str | None) -> None:
    reply = post_callingly(intake, CALL_COMPLETED, event=event)
    assert reply.status == 202
    stored = store.get(answer(reply)["id"])
    assert stored is not None and stored["kind"] == "call_completed"


@pytest.mark.parametrize("call_id", ["CAL\\ud800x", "\\udfff", "a\\ud83d", "\\u0000\\ud800"])
def test_ids_with_lone_surrogates_are_stored_not_500(intake: Intake, store: EventStore,
                                                     call_id: str) -> None:
    """Valid JSON escapes that are not valid UTF-8 must not lose a signed event."""
    raw = b'{"resource_id": "' + call_id.encode() + b'", "duration": "3"}'
    json.loads(raw)  # valid JSON
    reply = post_callrail(intake, raw)
    assert reply.status == 202, reply.body
    event = store.get(answer(reply)["id"])
    assert event is not None and event["body"] == raw and event["call_id"]
    raw = b'{"id": "' + call_id.encode() + b'", "seconds": 3}'
    reply = post_callingly(intake, raw)
    assert reply.status == 202, reply.body


def test_answers_never_echo_a_secret(intake: Intake) -> None:
    """Whatever comes back, no signing key, token or Rilla key is in it."""
    replies = [
        post_callrail(intake, POST_CALL),
        post_callrail(intake, POST_CALL, key="wrong-key-0000"),
        post_callrail(intake, b"[]"),
        post_callrail(intake, POST_CALL, event="bogus"),
        post_callingly(intake, {"id": 1}, token=ACME_TOKEN + "x"),
        post_callingly(intake, {"id": 1}, event="bogus"),
        post_callingly(intake, {"id": 1}, tenant="cronly"),
        post_callingly(intake, {"id": 1}, tenant="nobody"),
    ]
    assert [r.status for r in replies] == [202, 401, 400, 400, 401, 400, 404, 404]
    for reply in replies:
        for secret in SECRETS:
            assert secret[:12] not in reply.body.decode()


def test_received_at_and_id_follow_the_clock(fake_redis: fakeredis.FakeRedis) -> None:
    clock = FakeClock(start=1_800_000_000.0)
    intake = make_intake(fake_redis, clock)
    first = answer(post_callrail(intake, {**POST_CALL, "n": 1}))["id"]
    clock.advance(2.5)
    second = answer(post_callrail(intake, {**POST_CALL, "n": 2}))["id"]
    assert first < second   # ids sort by time
    store = EventStore(fake_redis)
    got = [float(store.get(i)["received_at"]) for i in (first, second)]  # type: ignore[index]
    assert got == [1_800_000_000.0, 1_800_000_002.5]
    assert fake_redis.zrange(keys.open_events("acme"), 0, -1, withscores=True) == [
        (first.encode(), 1_800_000_000.0), (second.encode(), 1_800_000_002.5)]


# -- repeated 401s from one address ---------------------------------------------------------
ATTACKER = "203.0.113.7"


def _bad(intake: Intake, client: str = ATTACKER, source: str = "callrail") -> Reply:
    raw = json.dumps(POST_CALL).encode()
    if source == "callrail":
        return intake.handle(WebhookRequest("callrail", "acme", raw, {}, "AAAA", client))
    return intake.handle(WebhookRequest("callingly", "acme", raw, {"token": ["guess"]},
                                        None, client))


def _good(intake: Intake, n: int, client: str = ATTACKER) -> Reply:
    raw = json.dumps({**POST_CALL, "resource_id": f"CALok{n}"}).encode()
    return intake.handle(WebhookRequest("callrail", "acme", raw, {},
                                        callrail_signature(ACME_KEY, raw), client))


def test_repeated_bad_signatures_from_one_address_are_slowed(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    intake = make_intake(fake_redis, clock, Settings(auth_failures_per_minute=5))
    for _ in range(3):
        assert_error(_bad(intake), 401)
    for _ in range(2):
        assert_error(_bad(intake, source="callingly"), 401)   # both sources count
    slowed = _bad(intake)
    data = assert_error(slowed, 429)
    assert "too many failed" in data["error"] and slowed.tenant == "acme"
    (name, wait), = slowed.headers
    assert name == "Retry-After" and 1 <= int(wait) <= 60
    assert_error(_bad(intake, source="callingly"), 429)
    # Valid webhooks from the same address are never held back, and do not reset the count.
    assert _good(intake, 1).status == 202 and _good(intake, 2).status == 202
    assert_error(_bad(intake), 429)
    # Another address is not affected.
    assert_error(_bad(intake, client="198.51.100.9"), 401)
    # The minute is the first failure's: more failures do not extend it.
    ttl = fake_redis.ttl(keys.auth_failures(ATTACKER))
    assert 0 < ttl <= 60
    assert fake_redis.get(keys.auth_failures(ATTACKER)) == b"8"
    assert fake_redis.get(keys.auth_failures("198.51.100.9")) == b"1"


def test_a_new_minute_forgets_the_failures(fake_redis: fakeredis.FakeRedis,
                                           clock: FakeClock) -> None:
    intake = make_intake(fake_redis, clock, Settings(auth_failures_per_minute=2))
    for _ in range(2):
        assert_error(_bad(intake), 401)
    assert_error(_bad(intake), 429)
    fake_redis.delete(keys.auth_failures(ATTACKER))   # what the key's 60 s expiry does
    assert_error(_bad(intake), 401)


def test_the_throttle_is_off_at_zero_or_without_an_address(fake_redis: fakeredis.FakeRedis,
                                                           clock: FakeClock) -> None:
    off = make_intake(fake_redis, clock, Settings(auth_failures_per_minute=0))
    for _ in range(30):
        assert_error(_bad(off), 401)
    on = make_intake(fake_redis, clock, Settings(auth_failures_per_minute=1))
    for _ in range(5):
        assert_error(_bad(on, client=""), 401)
    assert fake_redis.keys("rb:authfail:*") == []


def test_a_redis_error_while_counting_is_still_a_401(fake_redis: fakeredis.FakeRedis,
                                                     clock: FakeClock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    intake = make_intake(fake_redis, clock, Settings(auth_failures_per_minute=1))

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(intake.lifecycle.redis, "pipeline", refuse)
    for _ in range(3):
        assert_error(_bad(intake), 401)
