"""The pure transform layer: raw webhook bodies -> call snapshots -> one Rilla action.

Nothing here does I/O. The worker stores each event's Snapshot, merges all snapshots of a call
with ``merge_snapshots`` and asks ``build_action`` what to do with the result.
"""

from __future__ import annotations

from typing import Any

from rilla_bridge.transform import callingly, callrail
from rilla_bridge.transform.appointment import validate_appointment
from rilla_bridge.transform.build import Action, api_recording, build_action
from rilla_bridge.transform.merge import merge_snapshots
from rilla_bridge.transform.model import (
    Delete,
    NeedsRecording,
    Skip,
    Snapshot,
    TransformError,
    Upsert,
    event_id_for,
)

__all__ = [
    "DELIVERY_KINDS",
    "RANKS",
    "Action",
    "Delete",
    "NeedsRecording",
    "Skip",
    "Snapshot",
    "TransformError",
    "Upsert",
    "api_recording",
    "build_action",
    "event_id_for",
    "merge_snapshots",
    "parse_event",
    "validate_appointment",
]

# (source, kind) -> rank; fixed by the spec.
RANKS: dict[tuple[str, str], int] = {
    **{("callrail", kind): rank for kind, rank in callrail.RANKS.items()},
    **{("callingly", kind): rank for kind, rank in callingly.RANKS.items()},
}

# Kinds whose arrival should trigger a delivery: every Snapshot kind except the early CallRail
# ones, whose data is placeholders until the call has ended.
DELIVERY_KINDS: frozenset[str] = frozenset(
    kind for (_, kind), _rank in RANKS.items() if kind not in {"pre_call", "call_routing_complete"}
)


def parse_event(source: str, kind: str, raw: dict[str, Any]) -> Snapshot | Skip:
    """Read one raw webhook body into a Snapshot of its call, or a Skip with the reason.

    Raises TransformError for an unknown source or kind and for a body with no usable call id.
    A bad start time does not raise: it is kept so ``build_action`` can name it, since a later
    event about the same call may bring a good one.
    """
    if not isinstance(raw, dict):
        raise TransformError(f"malformed {source} {kind} body: expected a JSON object, "
                             f"got {type(raw).__name__}")
    if source == "callrail":
        return callrail.parse(kind, raw)
    if source == "callingly":
        return callingly.parse(kind, raw)
    raise TransformError(f"unknown source {source!r}")
