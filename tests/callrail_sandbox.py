"""The CallRail sandbox (``python -m sandbox.callrail``) as a real process, and its control API.

Shared by the integration tests and benchmarks; unit tests serve ``sandbox.callrail.make_app``
from a thread instead (``tests/loopback.py``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

from tests.support import free_port, port_open, wait_for


@contextmanager
def sandbox_process(*, hourly_limit: int = 1000, daily_limit: int = 10000,
                    hour_seconds: float = 3600, day_seconds: float = 86400,
                    extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run ``python -m sandbox.callrail`` on a free port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.callrail", "--host", "127.0.0.1",
         "--port", str(port), "--hourly-limit", str(hourly_limit),
         "--daily-limit", str(daily_limit), "--hour-seconds", str(hour_seconds),
         "--day-seconds", str(day_seconds), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"callrail sandbox listening on http://127.0.0.1:{port}", line
        wait_for(lambda: port_open(port), what="sandbox port")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def control(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call the sandbox control API (POST with a body, else GET)."""
    url = f"{base}/_sandbox/{path}"
    resp = requests.post(url, json=body, timeout=5) if body is not None else requests.get(
        url, timeout=5)
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data
