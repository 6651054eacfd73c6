"""The call trackers we take webhooks from, one module each (``callrail``, ``callingly``).

A provider module holds everything about its source: how a webhook is authenticated, its event
kinds and their ranks, how a kind is told from a body, the call id and the schema that reads a
body into a ``Snapshot``. This package maps a source name to its module and answers the
questions that span both (``parse_event``, ``RANKS``, ``DELIVERY_KINDS``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from rilla_bridge.providers import callingly, callrail
from rilla_bridge.transform.model import Skip, Snapshot, TransformError

PROVIDERS: dict[str, ModuleType] = {callrail.NAME: callrail, callingly.NAME: callingly}
SOURCES: tuple[str, ...] = tuple(PROVIDERS)

# (source, kind) -> rank, fixed by SPEC: call modified > post-call > routing complete > pre-call.
RANKS: dict[tuple[str, str], int] = {
    (name, kind): rank for name, mod in PROVIDERS.items() for kind, rank in mod.RANKS.items()
}

# Kinds whose arrival triggers a delivery: every ranked kind except the early CallRail ones,
# whose data is placeholders until the call has ended (they are merged into the call's state).
DELIVERY_KINDS: frozenset[str] = frozenset(
    kind for (_, kind) in RANKS if kind not in {"pre_call", "call_routing_complete"}
)


def label(source: str) -> str:
    """``CallRail`` / ``Callingly`` for messages."""
    return str(PROVIDERS[source].LABEL)


def parse_event(source: str, kind: str, raw: dict[str, Any]) -> Snapshot | Skip:
    """Read one raw webhook body into a Snapshot of its call, or a Skip with the reason.

    Raises TransformError for an unknown source or kind and for a body with no usable call id.
    A bad start time does not raise: it is kept so ``build_action`` can name it, since a later
    event about the same call may bring a good one.
    """
    if not isinstance(raw, dict):
        raise TransformError(f"malformed {source} {kind} body: expected a JSON object, "
                             f"got {type(raw).__name__}")
    provider = PROVIDERS.get(source)
    if provider is None:
        raise TransformError(f"unknown source {source!r}")
    result: Snapshot | Skip = provider.parse(kind, raw)
    return result
