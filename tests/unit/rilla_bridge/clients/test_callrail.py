"""CallRailClient (``rilla_bridge.clients.callrail``) over real HTTP on loopback: against the
CallRail sandbox app and against tiny stubs, both served from threads of this process. The
sandbox as a process of its own is in ``tests/integration/test_callrail_sandbox_process.py``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from rilla_bridge.clients.callrail import CallRailClient, classify
from rilla_bridge.providers.callrail import recording_api_call
from sandbox.callrail import DEFAULT_FIELDS, SandboxState, make_app, make_call
from tests.callrail_sandbox import control
from tests.loopback import LoopbackServer
from tests.support import free_port

KEY = "k-secret-123"
ACCT = "318840275"
TZ = timezone(timedelta(hours=-5))
WAIT = 10.0


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    with LoopbackServer(make_app(SandboxState())) as server:
        yield server.url


@pytest.fixture
def calls(sandbox: str) -> list[dict[str, Any]]:
    control(sandbox, "reset", {})
    start = datetime(2025, 3, 11, 9, 0, tzinfo=TZ)
    made = [make_call(f"CAL{i:032d}", start_time=start + timedelta(minutes=i),
                      company_id="COM1" if i % 4 else "COM2", has_recording=i != 3)
            for i in range(12)]
    made.append(make_call("CALold", start_time=start - timedelta(days=3), company_id="COM1"))
    control(sandbox, f"accounts/{ACCT}", {"api_key": KEY, "calls": made})
    return made


def test_recording_ok_and_missing_recording_is_permanent(sandbox: str,
                                                         calls: list[dict[str, Any]]) -> None:
    c = CallRailClient(sandbox)
    ok = c.get_recording(KEY, ACCT, calls[0]["id"])
    assert ok.kind == "ok" and ok.status == 200 and ok.data is not None
    assert ok.data["url"].startswith(f"https://app.callrail.com/calls/{calls[0]['id']}/recording/")
    missing = c.get_recording(KEY, ACCT, calls[3]["id"])
    assert (missing.kind, missing.status, missing.data) == ("permanent", 404, None)
    assert missing.error is not None and "Recording not found" in missing.error


def test_wrong_key_is_permanent_and_error_has_no_secret(sandbox: str,
                                                        calls: list[dict[str, Any]]) -> None:
    res = CallRailClient(sandbox).get_recording("wrong-key", ACCT, calls[0]["id"])
    assert (res.kind, res.status) == ("permanent", 401)
    assert res.error is not None and "wrong-key" not in res.error


def test_get_call_fields_add_to_default_set(sandbox: str, calls: list[dict[str, Any]]) -> None:
    c = CallRailClient(sandbox + "/v3/")  # a trailing /v3 in CALLRAIL_BASE_URL is accepted
    assert c.base_url == sandbox
    plain = c.get_call(KEY, ACCT, calls[1]["id"])
    assert plain.kind == "ok" and plain.data is not None
    assert set(plain.data) == set(DEFAULT_FIELDS)
    assert plain.data["recording"] == (f"{sandbox}/v3/a/{ACCT}/calls/{calls[1]['id']}"
                                       "/recording.json")
    # the API recording URL the sandbox serves is the one the providers recognise
    assert recording_api_call(plain.data["recording"]) == (ACCT, calls[1]["id"])
    rich = c.get_call(KEY, ACCT, calls[1]["id"], fields=["agent_email", "company_id", "tags"])
    assert rich.data is not None
    assert set(rich.data) == set(DEFAULT_FIELDS) | {"agent_email", "company_id", "tags"}
    assert isinstance(rich.data["duration"], int)


def test_relative_pagination_walks_every_page_once(sandbox: str,
                                                   calls: list[dict[str, Any]]) -> None:
    c = CallRailClient(sandbox)
    seen: list[str] = []
    page_url = None
    pages = 0
    while True:
        res = c.list_calls(KEY, ACCT, company_id="COM1", start_date="2025-03-11",
                           end_date="2025-03-11", fields=["company_id"], per_page=4,
                           page_url=page_url)
        assert res.kind == "ok" and res.data is not None
        pages += 1
        assert all(call["company_id"] == "COM1" for call in res.data["calls"])
        seen += [call["id"] for call in res.data["calls"]]
        if not res.data["has_next_page"]:
            assert res.data["next_page"] is None
            break
        assert "relative_pagination=true" in res.data["next_page"]
        page_url = res.data["next_page"]
    expected = [x["id"] for x in calls if x["company_id"] == "COM1" and x["id"] != "CALold"]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen)) == 9
    assert pages == 3


def test_count_calls_uses_offset_total(sandbox: str, calls: list[dict[str, Any]]) -> None:
    res = CallRailClient(sandbox).count_calls(KEY, ACCT, company_id=None,
                                              start_date="2025-03-08", end_date="2025-03-11")
    assert res.kind == "ok" and res.data == {"total_records": 13}
    com2 = CallRailClient(sandbox).count_calls(KEY, ACCT, company_id="COM2",
                                               start_date="2025-03-08", end_date="2025-03-11")
    assert com2.data == {"total_records": 3}


def test_next_page_on_another_host_is_refused_without_a_request(
        sandbox: str, calls: list[dict[str, Any]]) -> None:
    before = control(sandbox, "stats")["requests"]
    c = CallRailClient(sandbox)
    for url in (f"http://evil.example/v3/a/{ACCT}/calls.json?after=x",
                sandbox.replace("http://", "https://") + f"/v3/a/{ACCT}/calls.json"):
        res = c.list_calls(KEY, ACCT, company_id=None, start_date="2025-03-01",
                           end_date="2025-03-31", fields=(), page_url=url)
        assert res.kind == "permanent" and res.status is None
    assert control(sandbox, "stats")["requests"] == before


def test_forced_429_is_rate_limited_then_clears(sandbox: str,
                                                calls: list[dict[str, Any]]) -> None:
    control(sandbox, "force_429", {"account_id": ACCT, "count": 1})
    c = CallRailClient(sandbox)
    limited = c.get_call(KEY, ACCT, calls[0]["id"])
    assert (limited.kind, limited.status) == ("rate_limited", 429)
    assert c.get_call(KEY, ACCT, calls[0]["id"]).kind == "ok"
    stats = control(sandbox, "stats")
    assert stats["served_429"] == 1 and stats["by_account"][ACCT]["served_429"] == 1


def test_the_sandbox_enforces_its_quota() -> None:
    """A rolling hour of three requests (the app's state, served from this process); the window
    rolling over is seen in the process test, which runs the sandbox with a one-second hour."""
    with LoopbackServer(make_app(SandboxState(hourly_limit=3))) as server:
        control(server.url, "accounts/A1", {"api_key": KEY, "calls": [make_call("CAL1")]})
        c = CallRailClient(server.url)
        kinds = [c.get_call(KEY, "A1", "CAL1").kind for _ in range(5)]
        assert kinds == ["ok"] * 3 + ["rate_limited"] * 2
        stats = control(server.url, "stats")["by_account"]["A1"]
        assert (stats["requests"], stats["served_429"], stats["served_ok_window"]) == (5, 2, 3)


def test_bad_base_url_is_refused() -> None:
    for url in ("ftp://api.callrail.com", "api.callrail.com", "https://"):
        with pytest.raises(ValueError, match="http"):
            CallRailClient(url)


# -- stub servers ---------------------------------------------------------------------------
class Stub:
    """Answers every GET with ``status`` and a JSON error; a held answer waits for release."""

    def __init__(self) -> None:
        self.status = 500
        self.body = b'{"error": "boom"}'
        self.seen: list[dict[str, str]] = []
        self.hold = False
        self.gate = threading.Event()
        self.arrived = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.seen.append({k[5:].replace("_", "-").title(): v for k, v in environ.items()
                          if k.startswith("HTTP_")})
        self.arrived.set()
        if self.hold:
            self.gate.wait(WAIT)
        start_response(f"{self.status} X", [("Content-Type", "application/json")])
        return [self.body]


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    app = Stub()
    with LoopbackServer(app) as server:
        yield app, server.url
        app.gate.set()


def test_5xx_is_retryable_with_exactly_one_request_and_headers(stub: tuple[Stub, str]) -> None:
    app, url = stub
    res = CallRailClient(url).get_recording(KEY, ACCT, "CAL1")
    assert (res.kind, res.status) == ("retryable", 500)
    assert res.error is not None and "boom" in res.error and KEY not in res.error
    assert len(app.seen) == 1  # retries go back through the quota guard, never inline
    assert app.seen[0]["Authorization"] == f'Token token="{KEY}"'
    assert app.seen[0]["Request-From"] == "rilla-bridge"
    assert app.seen[0]["Accept"] == "application/json"


@pytest.mark.parametrize(("status", "body", "kind"), [
    (200, b"<html>outage</html>", "retryable"),     # a 2xx that is not CallRail's answer
    (200, b"[1, 2]", "retryable"),
    (301, b"", "permanent"),                       # never followed to another host
    (404, b"not json", "permanent"),
    (429, b"{}", "rate_limited"),
])
def test_odd_answers(stub: tuple[Stub, str], status: int, body: bytes, kind: str) -> None:
    app, url = stub
    app.status, app.body = status, body
    res = CallRailClient(url).get_call(KEY, ACCT, "CAL1")
    assert (res.kind, res.status, res.data) == (kind, status, None)
    assert len(app.seen) == 1


def test_count_without_total_records_is_permanent(stub: tuple[Stub, str]) -> None:
    app, url = stub
    app.status, app.body = 200, b'{"calls": []}'
    res = CallRailClient(url).count_calls(KEY, ACCT, company_id=None, start_date="2025-03-01",
                                          end_date="2025-03-02")
    assert (res.kind, res.status, res.data) == ("permanent", 200, None)
    assert res.error == "calls.json response has no total_records"


def test_timeout_and_refused_connection_are_retryable(stub: tuple[Stub, str]) -> None:
    app, url = stub
    app.status, app.hold = 200, True      # answered only after the client gave up
    res = CallRailClient(url, read_timeout=0.1).get_recording(KEY, ACCT, "CAL1")
    assert app.arrived.wait(WAIT)         # it reached the server, which had not answered
    assert res.kind == "retryable" and res.status is None
    assert res.error == f"timeout on GET /v3/a/{ACCT}/calls/CAL1/recording.json"
    app.gate.set()
    refused = CallRailClient(f"http://127.0.0.1:{free_port()}").get_recording(KEY, ACCT, "CAL1")
    assert refused.kind == "retryable" and refused.status is None
    assert refused.error is not None and refused.error.startswith("connection error")


def test_classify() -> None:
    assert [classify(s) for s in (200, 204, 429, 500, 503, 400, 404, 301)] == [
        "ok", "ok", "rate_limited", "retryable", "retryable", "permanent", "permanent",
        "permanent"]
