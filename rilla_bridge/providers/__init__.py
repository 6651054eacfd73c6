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


def search_fields(source: str, kind: str, body: dict[str, Any]
                  ) -> tuple[str | None, str | None, str | None]:
    """``(customer phone, customer name, agent email)`` of one raw body, as found, for the
    history's search columns: a call's come from the provider's own ``parse``; texts, forms
    and leads (which ``parse`` skips) are read best effort. Never raises."""
    try:
        result = parse_event(source, kind, body)
    except (TransformError, ValueError, TypeError, KeyError):
        result = None
    if isinstance(result, Snapshot):
        f = result.fields
        return _text(f.get("customer_phone")), _text(f.get("customer_name")), _text(
            f.get("agent_email"))
    if not isinstance(body, dict):
        return None, None, None
    return _loose_search_fields(kind, body)


def _text(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _loose_search_fields(kind: str, body: dict[str, Any]
                         ) -> tuple[str | None, str | None, str | None]:
    raw_form, raw_user = body.get("form_data"), body.get("user")
    form: dict[str, Any] = raw_form if isinstance(raw_form, dict) else {}
    # A text's customer is whoever is not the tracking number: the sender of a received
    # text, the recipient of a sent one (CallRail's source_number / destination_number).
    text_phone = body.get("destination_number" if kind == "text_sent" else "source_number")
    phone = (_text(body.get("customer_phone_number")) or _text(body.get("phone_number"))
             or _text(text_phone) or _text(form.get("phone_number")) or _text(form.get("phone")))
    first, last = _text(body.get("fname")), _text(body.get("lname"))  # Callingly lead bodies
    name = (_text(body.get("customer_name")) or " ".join(p for p in (first, last) if p)
            or _text(form.get("name")))
    agent: dict[str, Any] = raw_user if isinstance(raw_user, dict) else {}
    email = _text(body.get("agent_email")) or _text(agent.get("email"))
    return phone, name or None, email
