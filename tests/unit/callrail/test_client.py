"""CallRailClient against the sandbox (a real process on loopback) and tiny stub servers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from rilla_bridge.callrail.client import CallRailClient, classify, parse_recording_api_url
from rilla_bridge.callrail.sandbox import DEFAULT_FIELDS, make_call
from tests.support import free_port
from tests.unit.callrail.helpers import control, sandbox_process

KEY = "k-secret-123"
ACCT = "318840275"
TZ = timezone(timedelta(hours=-5))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    with sandbox_process() as base:
        yield base


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


def test_wrong_key_is_permanent_and_error_has_no_secret(sandbox: str,
                                                        calls: list[dict[str, Any]]) -> None:
    res = CallRailClient(sandbox).get_recording("wrong-key", ACCT, calls[0]["id"])
    assert (res.kind, res.status) == ("permanent", 401)
    assert res.error is not None and "wrong-key" not in res.error


def test_get_call_fields_add_to_default_set(sandbox: str, calls: list[dict[str, Any]]) -> None:
    c = CallRailClient(sandbox + "/v3/")  # a trailing /v3 in CALLRAIL_BASE_URL is accepted
    plain = c.get_call(KEY, ACCT, calls[1]["id"])
    assert plain.kind == "ok" and plain.data is not None
    assert set(plain.data) == set(DEFAULT_FIELDS)
    assert plain.data["recording"] == (f"{sandbox}/v3/a/{ACCT}/calls/{calls[1]['id']}"
                                       "/recording.json")
    assert parse_recording_api_url(plain.data["recording"]) == (ACCT, calls[1]["id"])
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


def test_sandbox_enforces_its_quota() -> None:
    with sandbox_process(hourly_limit=3, hour_seconds=1) as base:
        control(base, "accounts/A1", {"api_key": KEY, "calls": [make_call("CAL1")]})
        c = CallRailClient(base)
        kinds = [c.get_call(KEY, "A1", "CAL1").kind for _ in range(5)]
        assert kinds == ["ok"] * 3 + ["rate_limited"] * 2
        time.sleep(1.05)
        assert c.get_call(KEY, "A1", "CAL1").kind == "ok"


class _Stub(BaseHTTPRequestHandler):
    status = 500
    delay = 0.0
    seen: list[dict[str, str]] = []  # noqa: RUF012 - shared capture for the test

    def do_GET(self) -> None:
        _Stub.seen.append(dict(self.headers))
        time.sleep(self.delay)
        body = b'{"error": "boom"}'
        try:
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the timeout test hangs up before the answer on purpose

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    _Stub.status, _Stub.delay, _Stub.seen = 500, 0.0, []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_5xx_is_retryable_with_exactly_one_request_and_headers(stub: str) -> None:
    res = CallRailClient(stub).get_recording(KEY, ACCT, "CAL1")
    assert (res.kind, res.status) == ("retryable", 500)
    assert res.error is not None and "boom" in res.error and KEY not in res.error
    assert len(_Stub.seen) == 1  # retries go back through the quota guard, never inline
    assert _Stub.seen[0]["Authorization"] == f'Token token="{KEY}"'
    assert _Stub.seen[0]["Request-From"] == "rilla-bridge"


def test_timeout_and_refused_connection_are_retryable(stub: str) -> None:
    _Stub.status, _Stub.delay = 200, 0.5
    res = CallRailClient(stub, read_timeout=0.1).get_recording(KEY, ACCT, "CAL1")
    assert res.kind == "retryable" and res.status is None
    refused = CallRailClient(f"http://127.0.0.1:{free_port()}").get_recording(KEY, ACCT, "CAL1")
    assert refused.kind == "retryable" and refused.status is None


def test_classify_and_parse() -> None:
    assert [classify(s) for s in (200, 204, 429, 500, 503, 400, 404, 301)] == [
        "ok", "ok", "rate_limited", "retryable", "retryable", "permanent", "permanent",
        "permanent"]
    assert parse_recording_api_url(
        "https://api.callrail.com/v3/a/318/calls/CALabc/recording.json") == ("318", "CALabc")
    assert parse_recording_api_url(
        "https://app.callrail.com/calls/CALabc/recording/redirect?access_key=x") is None
    assert parse_recording_api_url("") is None


def test_sandbox_knows_accounts_given_at_start() -> None:
    """`--account ID:KEY` (the local run's demo account): known before anyone registers it,
    so the scheduler's first reconciliation is not refused."""
    with sandbox_process(extra=("--account", "555000111:demo-key-0001")) as base:
        ok = requests.get(f"{base}/v3/a/555000111/calls.json", timeout=5,
                          headers={"Authorization": 'Token token="demo-key-0001"'})
        assert ok.status_code == 200 and ok.json()["calls"] == []
        wrong = requests.get(f"{base}/v3/a/555000111/calls.json", timeout=5,
                             headers={"Authorization": 'Token token="other"'})
        assert wrong.status_code == 401
    out = subprocess.run([sys.executable, "-m", "rilla_bridge.callrail.sandbox", "--account",
                          "no-key"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and "ID:API_KEY" in out.stderr
