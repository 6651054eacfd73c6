"""The contract that keeps ``tests.fakes.FakeRilla`` honest: the same scenarios, with the same
expected ``RillaResult``s, against the fake and against the real ``RillaClient`` talking HTTP to
the Rilla sandbox (``sandbox.rilla.make_app``, served on loopback from a thread of this process).

Whatever the unit tests learn from the fake about Rilla's answers (bodies, statuses, what is
stored, the order of its checks) is what the client reports from the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rilla_bridge.clients.rilla import RillaAPI, RillaClient, RillaResult
from sandbox.rilla import Fault, SandboxState, make_app
from tests.fakes import FakeRilla
from tests.loopback import LoopbackServer

KEY = "contract-org-key-000001"
REP = "rep@acme.test"
FULL: dict[str, Any] = {
    "event_id": "callrail-CAL0001", "user_email": REP, "start_time": "2026-01-01 14:00:00",
    "end_time": "2026-01-01 14:05:00", "title": "Call with Jane",
    "customer": {"id": "+15555550100", "name": "Jane Smith"},
    "media_url": "https://app.callrail.com/calls/CAL0001/recording/redirect?access_key=k",
    "recording_type": "CALL_AUDIO",
}
MISSING = "Missing some required parameters in the body"


def created() -> RillaResult:
    return RillaResult("ok", 200, '{"message": "Successfully created appointment"}')


def updated() -> RillaResult:
    return RillaResult("ok", 200, '{"message": "Successfully updated appointment"}')


@dataclass
class Backend:
    """One implementation of ``RillaAPI`` and the handles a scenario needs on its Rilla."""

    name: str
    api: RillaAPI
    set_users: Callable[[list[str] | None], None]
    fail: Callable[..., None]           # (status, *, count=1, retry_after=None)
    stored: Callable[[], dict[str, dict[str, Any]]]


def fake_backend() -> Backend:
    fake = FakeRilla()

    def set_users(users: list[str] | None) -> None:
        fake.users = None if users is None else set(users)

    def fail(status: int, *, count: int = 1, retry_after: str | None = None) -> None:
        fake.fail(status, retry_after=retry_after, count=count)

    return Backend("fake", fake, set_users, fail, lambda: dict(fake.appointments.get(KEY, {})))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[SandboxState, str]]:
    state = SandboxState({KEY: None})
    with LoopbackServer(make_app(state)) as server:
        yield state, server.url


def sandbox_backend(state: SandboxState, client: RillaClient) -> Backend:
    state.reset()
    state.set_org(KEY, None)

    def fail(status: int, *, count: int = 1, retry_after: str | None = None) -> None:
        state.add_fault(Fault(status=status, remaining=count, retry_after=retry_after))

    def stored() -> dict[str, dict[str, Any]]:
        return {a["event_id"]: {k: v for k, v in a.items() if k not in ("org", "_sandbox")}
                for a in state.list_appointments(KEY)}

    return Backend("sandbox", client, lambda users: state.set_org(KEY, users), fail, stored)


@pytest.fixture(params=["fake", "sandbox"])
def rilla(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "fake":
        yield fake_backend()
        return
    state, url = request.getfixturevalue("sandbox")
    with RillaClient(url, connect_timeout=2, read_timeout=5) as client:
        yield sandbox_backend(state, client)


# -- upsert ---------------------------------------------------------------------------------

def test_upsert_creates_then_updates_and_merges(rilla: Backend) -> None:
    assert rilla.api.upsert(KEY, FULL) == created()
    change = {"event_id": FULL["event_id"], "user_email": REP, "result": "won",
              "customer": {"id": "+15555550100", "email": "jane@example.com"}}
    assert rilla.api.upsert(KEY, change) == updated()
    stored = rilla.stored()[FULL["event_id"]]
    assert stored["title"] == FULL["title"] and stored["result"] == "won"
    assert stored["customer"] == {"id": "+15555550100", "name": "Jane Smith",
                                  "email": "jane@example.com"}


def test_unknown_rep_is_422_only_when_the_org_lists_its_users(rilla: Backend) -> None:
    rilla.set_users(["Office@Acme.test", " REP@acme.test "])
    stranger = {**FULL, "user_email": "stranger@acme.test"}
    assert rilla.api.upsert(KEY, stranger) == RillaResult(
        "permanent", 422, "User email is not in Rilla")
    assert rilla.stored() == {}
    assert rilla.api.upsert(KEY, FULL) == created()   # trimmed, case-blind
    rilla.set_users(None)                             # an org without a users list
    assert rilla.api.upsert(KEY, {**stranger, "event_id": "callrail-CAL0002"}) == created()


@pytest.mark.parametrize(("change", "body"), [
    ({"event_id": ""}, MISSING),
    ({"event_id": None}, MISSING),
    ({"user_email": "  "}, MISSING),
    ({"title": ""}, MISSING),
    ({"start_time": None}, MISSING),
    ({"customer": {"id": "+15555550100"}}, MISSING),
    ({"customer": "Jane"}, MISSING),
    ({"start_time": "2026-01-01T14:00:00Z"},
     "Invalid start_time: expected yyyy-mm-dd hh:mm:ss (UTC)"),
    ({"end_time": "2026-13-01 14:00:00"}, "Invalid end_time: expected yyyy-mm-dd hh:mm:ss (UTC)"),
    ({"recording_type": None}, "recording_type is required when media_url is provided"),
    ({"recording_type": "VIDEO"}, "Invalid recording_type"),
    ({"recording_type": "CALL_AUDIO_WITH_LOCATION"},
     "location is required for CALL_AUDIO_WITH_LOCATION"),
])
def test_invalid_body_is_400(rilla: Backend, change: dict[str, Any], body: str) -> None:
    payload = {k: v for k, v in {**FULL, **change}.items() if v is not None}
    assert rilla.api.upsert(KEY, payload) == RillaResult("permanent", 400, body)
    assert rilla.stored() == {}


def test_an_update_needs_only_event_id_and_user_email(rilla: Backend) -> None:
    partial = {"event_id": FULL["event_id"], "user_email": REP, "result": "won"}
    assert rilla.api.upsert(KEY, partial) == RillaResult("permanent", 400, MISSING)
    assert rilla.api.upsert(KEY, FULL) == created()
    assert rilla.api.upsert(KEY, partial) == updated()


def test_an_invalid_body_is_400_before_an_unknown_rep_is_422(rilla: Backend) -> None:
    rilla.set_users(["office@acme.test"])
    bad = {**FULL, "user_email": "stranger@acme.test", "title": ""}
    assert rilla.api.upsert(KEY, bad) == RillaResult("permanent", 400, MISSING)


def test_a_payload_that_is_not_json_is_refused_before_sending(rilla: Backend) -> None:
    for value in (float("nan"), object()):
        result = rilla.api.upsert(KEY, {**FULL, "value": value})
        assert (result.kind, result.status, result.body) == ("permanent", None, "")
        assert result.error is not None
        assert result.error.startswith("payload is not JSON serializable: ")
    assert rilla.stored() == {}


# -- delete ---------------------------------------------------------------------------------

def test_delete_then_delete_again_is_ok_404(rilla: Backend) -> None:
    event_id = "callrail-a/b c?d"
    assert rilla.api.upsert(KEY, {**FULL, "event_id": event_id}) == created()
    assert rilla.api.delete(KEY, event_id) == RillaResult(
        "ok", 200, '{"message": "Successfully deleted appointment"}')
    assert rilla.stored() == {}
    assert rilla.api.delete(KEY, event_id) == RillaResult("ok", 404, "Appointment not found")
    assert rilla.api.delete(KEY, "callrail-never-sent") == RillaResult(
        "ok", 404, "Appointment not found")


def test_delete_of_an_empty_event_id_is_refused(rilla: Backend) -> None:
    assert rilla.api.delete(KEY, "") == RillaResult("permanent", None, "",
                                                    error="empty event_id")


# -- faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "phrase", "retry_after", "seconds"), [
    (500, "Internal Server Error", "4", 4.0),
    (503, "Service Unavailable", None, None),
    (429, "Too Many Requests", "30", 30.0),
])
def test_faults_are_retryable_and_store_nothing(rilla: Backend, status: int, phrase: str,
                                                retry_after: str | None,
                                                seconds: float | None) -> None:
    rilla.fail(status, count=2, retry_after=retry_after)
    expected = RillaResult("retryable", status, phrase, seconds)
    assert rilla.api.upsert(KEY, FULL) == expected
    assert rilla.api.upsert(KEY, FULL) == expected
    assert rilla.stored() == {}
    assert rilla.api.upsert(KEY, FULL) == created()      # the faults are used up


def test_a_faulted_delete_keeps_the_appointment(rilla: Backend) -> None:
    assert rilla.api.upsert(KEY, FULL) == created()
    rilla.fail(500)
    assert rilla.api.delete(KEY, FULL["event_id"]) == RillaResult(
        "retryable", 500, "Internal Server Error")
    assert list(rilla.stored()) == [FULL["event_id"]]
    assert rilla.api.delete(KEY, FULL["event_id"]).status == 200
