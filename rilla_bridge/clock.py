"""The one clock: every timestamp we store and every "now" a Lua script uses comes from here.

Production uses ``SystemClock`` (wall-clock epoch seconds). Tests pass a ``FakeClock`` and move
it by hand, so nothing in a unit test waits for real time to pass. Scripts never read Redis
``TIME``: they get "now" as an argument from the caller's clock, so a test's clock is the
script's clock too.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass (a fake clock just moves on)."""
        ...


class SystemClock:
    """The wall clock (all processes agree on it to within NTP's accuracy)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that only moves when told to (``advance``), for tests."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def __repr__(self) -> str:
        return f"FakeClock({self.t!r})"


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds (what the scripts compare)."""
    return int(seconds * 1000)
