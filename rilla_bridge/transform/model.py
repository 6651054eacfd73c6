"""The values the transform layer hands back: snapshots, actions and its one error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class TransformError(Exception):
    """An event that cannot become a Rilla payload; ``str(exc)`` names the missing or bad data."""


@dataclass(frozen=True)
class Skip:
    """Nothing to send, on purpose (the reason is recorded, the event is not dead-lettered)."""

    reason: str


@dataclass(frozen=True)
class Snapshot:
    """What one event says about one call: JSON-safe, normalized fields plus the event's rank."""

    call_id: str
    rank: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Upsert:
    """POST this payload to ``/custom/appointment``; ``notes`` say what was mended on the way
    (a value truncated, a fallback used) and go on the event's timeline."""

    payload: dict[str, Any]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delete:
    """DELETE ``/custom/appointment/{event_id}`` (a 404 there counts as done)."""

    event_id: str


@dataclass(frozen=True)
class NeedsRecording:
    """The recording is a CallRail API ``recording.json`` URL that must be resolved first."""

    api_url: str
    account_id: str
    call_id: str


def event_id_for(source: str, call_id: str) -> str:
    """Our Rilla ``event_id`` for a call: ``callrail-<id>`` or ``callingly-<id>``."""
    return f"{source}-{call_id}"
