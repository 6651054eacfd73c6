"""The Rilla sandbox (``sandbox.rilla``) answers every documented case with the seed's status
and body; through Flask's test client."""

from __future__ import annotations

import json
from typing import Any

import gevent
import pytest
from flask.testing import FlaskClient

from sandbox.rilla import SandboxState, _parse_org, make_app

KEY = "sandbox-key-0001"
OPEN_KEY = "sandbox-key-open"
REP = "rep@acme.test"

FULL = {
    "event_id": "appt-1", "user_email": REP, "start_time": "2024-06-15 14:00:00",
    "end_time": "2024-06-15 15:00:00", "title": "Estimate - Jane",
    "customer": {"id": "cust-1", "name": "Jane Smith", "phone": "555"},
}


@pytest.fixture
def state() -> SandboxState:
    return SandboxState({KEY: [REP, "Other@Acme.test"], OPEN_KEY: None})


@pytest.fixture
def client(state: SandboxState) -> FlaskClient:
    return make_app(state).test_client()


def post(client: FlaskClient, body: Any, key: str | None = KEY, path: str = "/custom/appointment",
         accept: str | None = None, raw: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, str]:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["x-api-key"] = key
    if accept:
        headers["Accept"] = accept
    data = raw if raw is not None else json.dumps(body).encode()
    response = client.post(path, data=data, headers=headers)
    return response.status_code, response.get_data(as_text=True)


def without(field: str) -> dict[str, Any]:
    return {k: v for k, v in FULL.items() if k != field}


MISSING = "Missing some required parameters in the body"


def test_create_then_update_merges_omitted_fields(client: FlaskClient,
                                                  state: SandboxState) -> None:
    assert post(client, FULL) == (200, "Successfully created appointment")
    update = {"event_id": "appt-1", "user_email": REP, "result": "lost",
              "customer": {"email": "j@x.test"}}
    assert post(client, update) == (200, "Successfully updated appointment")
    [stored] = state.list_appointments(KEY)
    assert stored["result"] == "lost"
    assert stored["title"] == "Estimate - Jane"
    assert stored["customer"] == {"id": "cust-1", "name": "Jane Smith", "phone": "555",
                                  "email": "j@x.test"}
    assert stored["org"] == "****0001" and KEY not in json.dumps(stored)
    assert stored["_sandbox"]["upserts"] == 2
    assert state.stats()["upserts_by_event"] == {"appt-1": 2}


def test_success_is_json_when_asked(client: FlaskClient) -> None:
    status, body = post(client, FULL, accept="application/json")
    assert status == 200 and json.loads(body) == {"message": "Successfully created appointment"}
    # errors stay plain text even then
    assert post(client, {"event_id": "x"}, accept="application/json") == (400, MISSING)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_invalid_json(client: FlaskClient, raw: bytes) -> None:
    assert post(client, None, raw=raw) == (400, "Invalid JSON data")
    assert post(client, None, raw=raw, path="/custom/appointment/match") == (
        400, "Invalid JSON data")


def test_non_json_content_type_is_invalid_json(client: FlaskClient) -> None:
    assert post(client, FULL, content_type="text/plain") == (400, "Invalid JSON data")


@pytest.mark.parametrize("key", [None, "unknown-key", ""])
def test_unknown_key_422(client: FlaskClient, key: str | None) -> None:
    assert post(client, FULL, key=key) == (422, "API key is not in Rilla")
    response = client.delete("/custom/appointment/appt-1",
                             headers={} if key is None else {"x-api-key": key})
    assert (response.status_code, response.get_data(as_text=True)) == (
        422, "API key is not in Rilla")


@pytest.mark.parametrize("field", ["event_id", "user_email"])
def test_event_id_and_user_email_always_required(client: FlaskClient, field: str) -> None:
    assert post(client, FULL) == (200, "Successfully created appointment")
    assert post(client, without(field)) == (400, MISSING)
    assert post(client, {**FULL, field: ""}) == (400, MISSING)


@pytest.mark.parametrize("body", [
    without("start_time"), without("end_time"), without("title"), without("customer"),
    {**FULL, "customer": {"id": "c"}}, {**FULL, "customer": {"name": "n"}},
    {**FULL, "customer": "Jane"}, {**FULL, "title": "  "},
])
def test_insert_requires_create_fields(client: FlaskClient, state: SandboxState,
                                       body: dict[str, Any]) -> None:
    assert post(client, body) == (400, MISSING)
    assert state.list_appointments() == []


def test_update_needs_only_event_id_and_user_email(client: FlaskClient) -> None:
    assert post(client, {"event_id": "appt-1", "user_email": REP}) == (400, MISSING)
    post(client, FULL)
    assert post(client, {"event_id": "appt-1", "user_email": REP}) == (
        200, "Successfully updated appointment")


@pytest.mark.parametrize("when", ["2024-06-15T14:00:00", "2024-06-15 14:00",
                                  "2024-13-01 00:00:00", "2024-06-15 14:00:00Z", 1718460000])
def test_time_format(client: FlaskClient, when: Any) -> None:
    status, body = post(client, {**FULL, "start_time": when})
    assert status == 400 and ("start_time" in body or body == MISSING)
    assert post(client, FULL)[0] == 200
    status, body = post(client, {"event_id": "appt-1", "user_email": REP, "end_time": when})
    assert status == 400 and "end_time" in body


@pytest.mark.parametrize(("extra", "status"), [
    ({"media_url": "https://m/x.mp3"}, 400),
    ({"media_url": "https://m/x.mp3", "recording_type": "VIDEO"}, 400),
    ({"media_url": "https://m/x.mp3", "recording_type": "CALL_AUDIO_WITH_LOCATION"}, 400),
    ({"media_url": "https://m/x.mp3", "recording_type": "CALL_AUDIO_WITH_LOCATION",
      "location": "Denver"}, 200),
    ({"media_url": "https://m/x.mp3", "recording_type": "CALL_AUDIO"}, 200),
    ({"media_url": "https://m/x.mp3", "recording_type": "APPOINTMENT_AUDIO"}, 200),
])
def test_recording_rules(client: FlaskClient, extra: dict[str, Any], status: int) -> None:
    assert post(client, {**FULL, **extra})[0] == status


def test_update_media_url_uses_stored_recording_type(client: FlaskClient) -> None:
    post(client, {**FULL, "recording_type": "CALL_AUDIO"})
    assert post(client, {"event_id": "appt-1", "user_email": REP,
                         "media_url": "https://m/y.mp3"})[0] == 200


def test_user_must_belong_to_org(client: FlaskClient, state: SandboxState) -> None:
    status, body = post(client, {**FULL, "user_email": "stranger@else.test"})
    assert status == 422 and body
    assert post(client, {**FULL, "user_email": "other@acme.TEST"})[0] == 200  # case-insensitive
    assert post(client, {**FULL, "user_email": "anyone@else.test"}, key=OPEN_KEY)[0] == 200
    assert len(state.list_appointments(KEY)) == 1


def test_orgs_are_isolated(client: FlaskClient, state: SandboxState) -> None:
    post(client, {**FULL, "user_email": "x@y.test"}, key=OPEN_KEY)
    # same event_id in another org is an insert, so create fields are required there
    assert post(client, {"event_id": "appt-1", "user_email": REP}) == (400, MISSING)
    response = client.delete("/custom/appointment/appt-1", headers={"x-api-key": KEY})
    assert response.status_code == 404


def test_delete(client: FlaskClient, state: SandboxState) -> None:
    post(client, {**FULL, "event_id": "a/b c"})
    response = client.delete("/custom/appointment/a%2Fb%20c", headers={"x-api-key": KEY})
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "Successfully deleted appointment"
    again = client.delete("/custom/appointment/a%2Fb%20c", headers={"x-api-key": KEY})
    assert again.status_code == 404 and again.get_data(as_text=True) == "Appointment not found"
    assert state.list_appointments() == [] and state.stats()["deletes"] == 1


def test_match_table(client: FlaskClient, state: SandboxState) -> None:
    conv = "f1a3e9d8-2b46-4c1a-9c7e-7e4a18d2c93f"
    match = "/custom/appointment/match"
    body = {"event_id": "appt-1", "conversation_id": conv}
    assert post(client, body, key="nope", path=match) == (422, "API key is not in Rilla")
    assert post(client, {"event_id": "appt-1"}, path=match) == (400, MISSING)
    assert post(client, {"conversation_id": conv}, path=match) == (400, MISSING)
    assert post(client, body, path=match) == (404, "Event not found")
    post(client, FULL)
    assert post(client, body, path=match) == (404, "Conversation not found")
    state.add_conversation(OPEN_KEY, conv, has_recording=True)  # another org's conversation
    assert post(client, body, path=match) == (404, "Conversation not found")
    ctl = client.post("/_sandbox/conversations",
                      json={"api_key": KEY, "conversation_id": conv, "has_recording": False})
    assert ctl.status_code == 200
    assert post(client, body, path=match) == (422, "Conversation has no recording to link")
    state.add_conversation(KEY, conv, has_recording=True, recording_missing=True)
    assert post(client, body, path=match) == (
        422, "Conversation's recording could not be found to link")
    state.add_conversation(KEY, conv, has_recording=True)
    assert post(client, body, path=match) == (200, "Successfully matched conversation to event")
    assert post(client, body, path=match)[0] == 200  # idempotent
    [linked] = state.list_conversations(KEY)
    assert linked["appointment_id"] == "appt-1"


def test_fault_count_then_normal(client: FlaskClient) -> None:
    response = client.post("/_sandbox/faults",
                           json={"status": 500, "count": 2, "retry_after": "7"})
    assert response.status_code == 200
    for _ in range(2):
        faulted = client.post("/custom/appointment", json=FULL, headers={"x-api-key": KEY})
        assert faulted.status_code == 500 and faulted.headers["Retry-After"] == "7"
    assert post(client, FULL) == (200, "Successfully created appointment")
    stats = client.get("/_sandbox/stats").get_json()
    assert stats["by_status"] == {"500": 2, "200": 1} and stats["requests"] == 3
    assert stats["upserts_by_event"] == {"appt-1": 1}
    # API requests begun, none still being answered; control requests are not counted
    assert (stats["started"], stats["in_progress"]) == (3, 0)


def test_fault_until_cleared_and_per_key(client: FlaskClient) -> None:
    client.post("/_sandbox/faults", json={"status": 503, "count": None, "api_key": KEY,
                                          "body": "down"})
    for _ in range(3):
        assert post(client, FULL) == (503, "down")
    assert post(client, {**FULL, "user_email": "z@z.test"}, key=OPEN_KEY)[0] == 200
    assert client.delete("/_sandbox/faults").status_code == 200
    assert post(client, FULL)[0] == 200


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sandbox's latency waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(gevent, "sleep", waited.append)   # what sandbox.rilla calls
    return waited


def test_latency_applies(client: FlaskClient, state: SandboxState, delays: list[float]) -> None:
    assert client.post("/_sandbox/latency", json={"latency_ms": 150}).status_code == 200
    assert post(client, FULL)[0] == 200
    assert delays == [0.15]
    client.post("/_sandbox/latency", json={"latency_ms": 0})
    assert post(client, FULL)[0] == 200
    assert delays == [0.15]                       # no latency, no wait
    client.post("/_sandbox/faults", json={"status": None, "count": 1, "latency_ms": 150})
    assert post(client, FULL)[0] == 200
    assert post(client, FULL)[0] == 200           # the fault's one request is used up
    assert delays == [0.15, 0.15]


def test_latency_per_key_and_faults_add_up(client: FlaskClient, state: SandboxState,
                                          delays: list[float]) -> None:
    client.post("/_sandbox/latency", json={"latency_ms": 100})
    client.post("/_sandbox/latency", json={"latency_ms": 40, "api_key": OPEN_KEY})
    client.post("/_sandbox/faults", json={"status": 503, "count": 1, "latency_ms": 25,
                                          "api_key": KEY})
    assert post(client, FULL)[0] == 503
    assert post(client, {**FULL, "user_email": "x@y.test"}, key=OPEN_KEY)[0] == 200
    assert post(client, FULL)[0] == 200
    assert delays == [0.125, 0.04, 0.1]
    # control requests are never delayed
    client.get("/_sandbox/stats")
    assert delays == [0.125, 0.04, 0.1]


def test_control_api_validation_and_orgs(client: FlaskClient) -> None:
    assert client.post("/_sandbox/faults", json={"status": 99}).status_code == 400
    assert client.post("/_sandbox/faults", json={"status": 500, "count": 0}).status_code == 400
    assert client.post("/_sandbox/latency", json={"latency_ms": -1}).status_code == 400
    assert client.put("/_sandbox/orgs/new-org-key-1", json={"users": "x"}).status_code == 400
    assert client.put("/_sandbox/orgs/new-org-key-1", json={"users": ["n@n.test"]}).status_code \
        == 200
    assert post(client, {**FULL, "user_email": "n@n.test"}, key="new-org-key-1")[0] == 200
    assert client.put("/_sandbox/orgs/new-org-key-1", json={"users": None}).status_code == 200
    assert post(client, {**FULL, "user_email": "q@q.test"}, key="new-org-key-1")[0] == 200


def test_requests_log_reset_and_no_keys(client: FlaskClient, state: SandboxState) -> None:
    post(client, FULL)
    post(client, {"event_id": "e2"}, key="wrong")
    client.delete("/custom/appointment/appt-1", headers={"x-api-key": KEY})
    log = client.get("/_sandbox/requests?limit=2").get_json()
    assert [(r["method"], r["status"], r["event_id"]) for r in log] == [
        ("POST", 422, "e2"), ("DELETE", 200, "appt-1")]
    assert set(log[0]) == {"method", "path", "status", "event_id", "received_at"}
    dumped = json.dumps([client.get(p).get_json() for p in (
        "/_sandbox/requests", "/_sandbox/appointments", "/_sandbox/stats")])
    assert KEY not in dumped
    client.post("/_sandbox/faults", json={"status": 500})
    assert client.post("/_sandbox/reset").status_code == 200
    assert client.get("/_sandbox/stats").get_json() == {
        "requests": 0, "started": 0, "in_progress": 0, "by_status": {},
        "upserts_by_event": {}, "deletes": 0}
    assert post(client, FULL)[0] == 200  # faults cleared, orgs kept


def test_parse_org_argument() -> None:
    assert _parse_org("k") == ("k", None)
    assert _parse_org("k=a@x,b@y") == ("k", ["a@x", "b@y"])
    assert _parse_org("k=") == ("k", [])


def test_rilla_bridge_sandbox_rilla_help_documents_the_control_api() -> None:
    from click.testing import CliRunner

    from ops.cli import main

    result = CliRunner().invoke(main, ["sandbox", "rilla", "--help"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("usage: rilla-bridge sandbox rilla")
    for route in ("/_sandbox/faults", "/_sandbox/latency", "/_sandbox/orgs/KEY",
                  "/_sandbox/appointments", "/_sandbox/reset"):
        assert route in out, route
    assert '"count"' in out and '"retry_after"' in out and '"api_key"' in out
