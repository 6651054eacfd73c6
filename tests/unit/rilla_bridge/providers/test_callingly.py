"""Callingly's webhooks: the token, the event kinds, the call id and the ``call_completed``
schema (``rilla_bridge.providers.callingly``)."""

from __future__ import annotations

from typing import Any

import pytest

from rilla_bridge.providers import parse_event
from rilla_bridge.providers.callingly import (
    KINDS,
    UNKEPT_KINDS,
    call_id,
    detect_kind,
    kind_of,
    token_ok,
)
from rilla_bridge.transform.model import TransformError
from tests.fakes import load, skip_reason, snap


def test_call_completed_is_normalized() -> None:
    s = snap("callingly", "call_completed", load("callingly", "call_completed"))
    assert s.call_id == "41872219"
    assert s.rank == 2
    f = s.fields
    assert f["start_time"] == "2025-03-11 16:42:17"      # 09:42:17-07:00
    assert f["duration"] == 263
    assert f["agent_email"] == "dana@sunvalleyroofing.example"
    assert f["customer_id"] == "7730452"
    assert f["customer_name"] == "Marcus Bell"
    assert f["customer_email"] == "marcus.bell@example.com"
    assert f["lead_source"] == "Facebook Lead Ads"
    assert f["team"] == "Inbound Leads"
    assert f["tags"] == ["Appointment Set"]              # lead tag and call tag, once
    assert f["recording"] == "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3"


def test_missed_call_has_nulls_not_errors() -> None:
    f = snap("callingly", "call_completed", load("callingly", "call_completed_missed")).fields
    assert f["agent_email"] is None
    assert f["recording"] is None
    assert f["result"] is None
    assert f["customer_name"] is None                    # "" first and last name
    assert f["customer_phone"] == "+5511955550142"
    assert f["start_time"] == "2026-01-29 21:02:05"


def test_call_tag_is_added_to_lead_tags() -> None:
    raw = load("callingly", "call_completed")
    raw["tag"] = {"id": 1, "name": "Hot"}
    assert snap("callingly", "call_completed", raw).fields["tags"] == ["Appointment Set", "Hot"]


def test_api_spelling_of_names_is_read() -> None:
    raw = load("callingly", "call_completed")
    raw["lead"] = {"id": 5, "fname": "Ana", "lname": "Ruiz"}
    assert snap("callingly", "call_completed", raw).fields["customer_name"] == "Ana Ruiz"


def test_lead_of_the_wrong_shape_is_missing_not_fatal() -> None:
    raw = load("callingly", "call_completed")
    raw["lead"] = "7730452"
    raw["user"] = ["x"]
    f = snap("callingly", "call_completed", raw).fields
    assert f["customer_id"] is None
    assert f["agent_email"] is None


def test_bad_datetime_is_kept_for_the_reason() -> None:
    raw = load("callingly", "call_completed")
    raw["datetime"] = "Mar 11, 2025 09:42:17"
    f = snap("callingly", "call_completed", raw).fields
    assert f["start_time"] is None
    assert f["start_time_invalid"] == "Mar 11, 2025 09:42:17"


@pytest.mark.parametrize("kind", ["lead_created", "lead_updated"])
def test_lead_events_are_skipped(kind: str) -> None:
    assert skip_reason(parse_event("callingly", kind, load("callingly", kind))).startswith(
        f"Callingly {kind}")


def test_missing_id_and_unknown_kind_are_errors() -> None:
    raw = load("callingly", "call_completed")
    del raw["id"]
    with pytest.raises(TransformError, match="no usable call id: id missing"):
        parse_event("callingly", "call_completed", raw)
    with pytest.raises(TransformError, match="unknown Callingly event kind 'call_started'"):
        parse_event("callingly", "call_started", load("callingly", "call_completed"))


# -- the token, kinds and the call id intake records ------------------------------------------
TOKEN = "acme-callingly-token-01"


def test_token_must_match_exactly() -> None:
    assert token_ok((TOKEN,), TOKEN)


@pytest.mark.parametrize("given", [None, "", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper(),
                                   f" {TOKEN}", f"{TOKEN} ", TOKEN + "\u00e9", "\ud800"])
def test_any_other_token_is_refused(given: str | None) -> None:
    assert not token_ok((TOKEN,), given)


@pytest.mark.parametrize("tokens", [(TOKEN, "acme-callingly-token-02"),
                                    ("acme-callingly-token-00", TOKEN)])
def test_either_token_of_a_rotation_is_accepted(tokens: tuple[str, str]) -> None:
    assert token_ok(tokens, TOKEN)
    assert token_ok(tokens, tokens[0]) and token_ok(tokens, tokens[1])
    assert not token_ok(tokens, "acme-callingly-token-03")
    assert not token_ok(tokens, None)


def test_no_token_accepts_nothing() -> None:
    assert not token_ok((), TOKEN)
    assert not token_ok((), "")


def test_kinds() -> None:
    assert frozenset({"call_completed", "lead_created", "lead_updated"}) == KINDS
    # lead bodies carry account secrets: never stored
    assert frozenset({"lead_created", "lead_updated"}) == UNKEPT_KINDS


@pytest.mark.parametrize(("body", "kind"), [
    ({"id": 1, "updatedField": "status"}, "lead_updated"),
    ({"id": 1, "updatedValue": "x", "lead": {"id": 2}}, "lead_updated"),
    ({"id": 1, "lead": {"id": 2}}, "call_completed"),
    ({"id": 1, "seconds": 3}, "call_completed"),
    ({"id": 1, "recording_url": None}, "call_completed"),
    ({"id": 1, "fname": "Ana"}, "lead_created"),
    ({"id": 1, "lname": "Ruiz"}, "lead_created"),
    ({"id": 1, "lead": "7730452", "fname": "Ana"}, "lead_created"),   # lead must be an object
    ({}, "call_completed"),
])
def test_kind_from_shape(body: dict[str, Any], kind: str) -> None:
    assert detect_kind(body) == kind


@pytest.mark.parametrize(("claimed", "body", "kind"), [
    ("call_completed", {"id": 1, "seconds": 3}, "call_completed"),
    (None, {"id": 1, "seconds": 3}, "call_completed"),
    ("lead_created", {"id": 1, "seconds": 3}, "lead_created"),   # a lead is never kept
    # A body shaped like a lead is a lead, whatever the unsigned ?event= says...
    ("call_completed", {"id": 1, "fname": "Ana"}, "lead_created"),
    ("call_completed", {"id": 1, "updatedField": "status"}, "lead_updated"),
    ("lead_created", {"id": 1, "updatedField": "status"}, "lead_updated"),
    # ...and so is one carrying a lead's account secrets, anywhere in it.
    ("call_completed", {"id": 1, "seconds": 3, "two_factor_secret": "x"}, "lead_updated"),
    ("call_completed", {"id": 1, "user": {"openai_key": "sk-x"}}, "lead_updated"),
    ("call_completed", {"id": 1, "lead": {"id": 2, "users": [{"stripe_id": "cus"}]}},
     "lead_updated"),
    (None, {"id": 1, "account": {"webhook_slug": "x"}}, "lead_updated"),
    ("call_completed", {"id": 1, "lead": {"id": 2, "updatedValue": "x"}}, "lead_updated"),
])
def test_kind_of_a_lead_shaped_body_is_a_lead_whatever_the_event_param(
        claimed: str | None, body: dict[str, Any], kind: str) -> None:
    assert kind_of(claimed, body) == kind
    assert (kind in UNKEPT_KINDS) == kind.startswith("lead_")


def test_kind_of_the_real_lead_bodies_posted_as_calls() -> None:
    for fixture in ("lead_created", "lead_updated"):
        assert kind_of("call_completed", load("callingly", fixture)) == fixture
    assert kind_of("call_completed", load("callingly", "call_completed")) == "call_completed"


@pytest.mark.parametrize(("fixture", "kind"), [
    ("call_completed", "call_completed"), ("call_completed_missed", "call_completed"),
    ("lead_created", "lead_created"), ("lead_updated", "lead_updated"),
])
def test_kind_of_the_real_bodies(fixture: str, kind: str) -> None:
    assert detect_kind(load("callingly", fixture)) == kind


def test_call_id_only_for_calls() -> None:
    assert call_id("call_completed", {"id": 41872219}) == "41872219"
    assert call_id("call_completed", {"id": "a\ud83d"}) == "a?"
    assert call_id("call_completed", {"id": True}) is None
    assert call_id("call_completed", {}) is None
    for kind in ("lead_created", "lead_updated"):
        assert call_id(kind, {"id": 41872219}) is None   # a lead is not a call


@pytest.mark.parametrize(("seconds", "call_seconds", "duration", "invalid"), [
    (263, None, 263, None), (None, 40, 40, None), (95.5, 12, 96, None), ("0", 12, 0, None),
    ("1e9", 12, None, "'1e9'"), (-5, None, None, "-5"), (90000, None, None, "90000"),
])
def test_seconds_are_rounded_or_kept_as_invalid(seconds: Any, call_seconds: Any,
                                                duration: int | None,
                                                invalid: str | None) -> None:
    raw = {**load("callingly", "call_completed"), "seconds": seconds,
           "call_seconds": call_seconds}
    f = snap("callingly", "call_completed", raw).fields
    assert (f["duration"], f["duration_invalid"]) == (duration, invalid)
