"""What spans both providers (``rilla_bridge.providers``): the registry, ranks, delivery kinds
and ``parse_event``'s own checks."""

from __future__ import annotations

import pytest

from rilla_bridge.providers import (
    DELIVERY_KINDS,
    PROVIDERS,
    RANKS,
    SOURCES,
    callingly,
    callrail,
    label,
    parse_event,
)
from rilla_bridge.transform.model import TransformError
from tests.fakes import load


def test_one_module_per_source() -> None:
    assert {"callrail": callrail, "callingly": callingly} == PROVIDERS
    assert SOURCES == ("callrail", "callingly")
    assert (label("callrail"), label("callingly")) == ("CallRail", "Callingly")


def test_ranks_are_the_spec_order() -> None:
    """call modified > post-call > routing complete > pre-call; Callingly's one kind is a
    post-call."""
    assert RANKS == {
        ("callrail", "pre_call"): 0,
        ("callrail", "call_routing_complete"): 1,
        ("callrail", "post_call"): 2,
        ("callrail", "outbound_post_call"): 2,
        ("callrail", "api_call"): 2,
        ("callrail", "call_modified"): 3,
        ("callrail", "outbound_call_modified"): 3,
        ("callingly", "call_completed"): 2,
    }


def test_delivery_kinds_are_the_snapshot_kinds_after_the_call_ended() -> None:
    assert frozenset({
        "post_call", "call_modified", "outbound_post_call", "outbound_call_modified", "api_call",
        "call_completed",
    }) == DELIVERY_KINDS


def test_unknown_source_and_non_object() -> None:
    with pytest.raises(TransformError, match="unknown source 'twilio'"):
        parse_event("twilio", "post_call", load("callrail", "post_call"))
    with pytest.raises(TransformError, match="malformed callingly call_completed body: "
                                             "expected a JSON object, got list"):
        parse_event("callingly", "call_completed", [1, 2])  # type: ignore[arg-type]
