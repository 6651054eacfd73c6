from __future__ import annotations

import pytest

from rilla_bridge.transform import TransformError, parse_event
from tests.unit.transform.helpers import load, skip_reason, snap


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
