"""The CallRail sandbox as a process (``python -m sandbox.callrail``): its command line, its
rolling quota window in real time, and the client against it."""

from __future__ import annotations

import subprocess
import sys

import requests

from rilla_bridge.clients.callrail import CallRailClient
from sandbox.callrail import make_call
from tests.callrail_sandbox import control, sandbox_process
from tests.support import wait_for

KEY = "k-secret-123"


def test_client_against_the_sandbox_process() -> None:
    with sandbox_process() as base:
        call = make_call("CAL1")
        control(base, "accounts/A1", {"api_key": KEY, "calls": [call]})
        c = CallRailClient(base)
        got = c.get_call(KEY, "A1", "CAL1")
        assert got.kind == "ok" and got.data is not None
        assert got.data["recording"] == f"{base}/v3/a/A1/calls/CAL1/recording.json"
        recording = c.get_recording(KEY, "A1", "CAL1")
        assert recording.data == {"url": call["recording_redirect"]}
        assert control(base, "stats")["by_account"]["A1"]["requests"] == 2


def test_sandbox_enforces_its_quota_and_the_window_rolls() -> None:
    with sandbox_process(hourly_limit=3, hour_seconds=1) as base:
        control(base, "accounts/A1", {"api_key": KEY, "calls": [make_call("CAL1")]})
        c = CallRailClient(base)
        kinds = [c.get_call(KEY, "A1", "CAL1").kind for _ in range(5)]
        assert kinds == ["ok"] * 3 + ["rate_limited"] * 2
        # a refused request does not count: once the one-second window has rolled, it serves
        wait_for(lambda: c.get_call(KEY, "A1", "CAL1").kind == "ok", timeout=10,
                 what="the sandbox's hour to roll")
        assert control(base, "stats")["by_account"]["A1"]["served_ok_window"] >= 1


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


def test_a_malformed_account_argument_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "sandbox.callrail", "--account", "no-key"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and "ID:API_KEY" in out.stderr
