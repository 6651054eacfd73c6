"""CallRail API work run by the ``callrail`` worker (issue 4 fills this in)."""

from __future__ import annotations

from typing import Any

from workers.pipeline import Runtime


def attach(rt: Runtime) -> None:
    """Give the delivery pipeline its recording lookup (none yet)."""
    rt.recording_lookup = None


def run(rt: Runtime, job: dict[str, Any]) -> str:
    raise NotImplementedError("CallRail jobs are not wired yet")


def scheduled_jobs() -> list[tuple[str, float, Any]]:
    return []
