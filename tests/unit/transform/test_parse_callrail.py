from __future__ import annotations

import pytest

from rilla_bridge.transform import DELIVERY_KINDS, Skip, TransformError, parse_event
from tests.unit.transform.helpers import load, skip_reason, snap

CAL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"


@pytest.mark.parametrize(("fixture", "kind", "rank"), [
    ("pre_call", "pre_call", 0),
    ("call_routing_complete", "call_routing_complete", 1),
    ("post_call", "post_call", 2),
    ("outbound_post_call", "outbound_post_call", 2),
    ("api_call", "api_call", 2),
    ("call_modified_spam", "call_modified", 3),
    ("call_modified_recording", "outbound_call_modified", 3),
])
def test_call_kinds_have_the_spec_rank(fixture: str, kind: str, rank: int) -> None:
    assert snap("callrail", kind, load("callrail", fixture)).rank == rank


def test_delivery_kinds_are_the_snapshot_kinds_after_the_call_ended() -> None:
    assert frozenset({
        "post_call", "call_modified", "outbound_post_call", "outbound_call_modified", "api_call",
        "call_completed",
    }) == DELIVERY_KINDS


def test_modern_post_call_is_normalized() -> None:
    s = snap("callrail", "post_call", load("callrail", "post_call"))
    assert s.call_id == CAL
    f = s.fields
    # company_time_zone is America/Denver but the value says -05:00: the value wins.
    assert f["start_time"] == "2025-04-02 16:03:12"
    assert f["start_time_invalid"] is None
    assert f["duration"] == 312                # "312" in the body
    assert f["answered"] is True
    assert f["spam"] is False
    assert f["value"] is None                  # "" in the body
    assert f["customer_id"] == "PER1f6a2d9c4b8e47a0b5c3e8d7f6a29b10"
    assert f["customer_name"] == "Jordan Pike"
    assert f["tags"] == ["new-customer", "roof-repair"]
    assert f["recording"].startswith("https://app.callrail.com/calls/")


def test_outbound_string_booleans_and_numbers() -> None:
    f = snap("callrail", "outbound_post_call", load("callrail", "outbound_post_call")).fields
    assert f["answered"] is True               # "true"
    assert f["duration"] == 247                # "247"
    assert f["agent_email"] == "dana.whitfield@hillcountryroofing.example"
    assert f["campaign"] is None               # "" in the body


def test_string_false_is_false_not_truthy() -> None:
    raw = load("callrail", "outbound_post_call")
    raw["answered"] = "false"
    assert snap("callrail", "outbound_post_call", raw).fields["answered"] is False


def test_snapshot_fields_are_json_safe() -> None:
    for fixture, kind in [("post_call", "post_call"), ("api_call", "api_call"),
                          ("legacy_post_call", "post_call")]:
        for value in snap("callrail", kind, load("callrail", fixture)).fields.values():
            assert value is None or isinstance(value, (str, int, float, bool)) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))


def test_empty_strings_become_none() -> None:
    f = snap("callrail", "post_call", load("callrail", "post_call_no_recording")).fields
    assert f["recording"] is None
    assert "" not in f.values()


def test_legacy_numeric_id_is_the_call_id() -> None:
    s = snap("callrail", "post_call", load("callrail", "legacy_post_call"))
    assert s.call_id == "766970532"
    assert s.fields["customer_id"] is None      # no person_resource_id in 2018 bodies


def test_resource_id_wins_over_legacy_id() -> None:
    raw = load("callrail", "post_call")
    raw["id"] = 123456
    assert snap("callrail", "post_call", raw).call_id == CAL


def test_legacy_datetime_is_the_fallback_start() -> None:
    raw = load("callrail", "legacy_post_call")
    raw["start_time"] = ""
    assert snap("callrail", "post_call", raw).fields["start_time"] == "2018-02-19 18:41:00"
    del raw["start_time"]
    assert snap("callrail", "post_call", raw).fields["start_time"] == "2018-02-19 18:41:00"


def test_bad_start_time_does_not_raise_and_is_kept() -> None:
    raw = load("callrail", "post_call")
    raw["start_time"] = "2025-13-45"
    del raw["datetime"]
    f = snap("callrail", "post_call", raw).fields
    assert f["start_time"] is None
    assert f["start_time_invalid"] == "2025-13-45"


def test_api_call_tag_objects_and_person_id() -> None:
    s = snap("callrail", "api_call", load("callrail", "api_call"))
    assert s.call_id == "CAL5e9b1d3f7a0c42e8b6d4f2a0c8e6b4d2f0"
    assert s.fields["tags"] == ["estimate-booked", "gutters"]
    assert s.fields["duration"] == 148
    assert s.fields["customer_id"] == "PER0a2c4e6b8d1f43a5c7e9b1d3f5a7c9e1b3"
    assert s.fields["start_time"] == "2025-04-04 20:05:51"


def test_numeric_person_id_is_not_a_customer_id() -> None:
    raw = load("callrail", "legacy_post_call")
    raw["person_id"] = 99812
    assert snap("callrail", "post_call", raw).fields["customer_id"] is None


def test_place_name_is_not_a_customer_name() -> None:
    f = snap("callrail", "post_call", load("callrail", "post_call_no_recording")).fields
    assert f["customer_name"] is None          # "Laguna Beach Ca" from Laguna Beach, CA
    raw = load("callrail", "post_call")
    raw.update(customer_name="BLUE RIDGE, GA", customer_city="Blue Ridge", customer_state="GA")
    assert snap("callrail", "post_call", raw).fields["customer_name"] is None
    raw.update(customer_name="WIRELESS CALLER")
    assert snap("callrail", "post_call", raw).fields["customer_name"] is None
    raw.update(customer_name="Ridge Blue")
    assert snap("callrail", "post_call", raw).fields["customer_name"] == "Ridge Blue"


def test_pre_call_placeholders_are_dropped() -> None:
    f = snap("callrail", "pre_call", load("callrail", "pre_call")).fields
    for key in ("answered", "duration", "spam", "recording", "voicemail"):
        assert f[key] is None, key
    assert f["customer_phone"] == "+17205550139"
    assert f["start_time"] == "2025-04-02 16:03:12"


def test_routing_complete_keeps_call_flow_tags() -> None:
    f = snap("callrail", "call_routing_complete", load("callrail", "call_routing_complete")).fields
    assert f["tags"] == ["new-customer"]
    assert f["answered"] is None


@pytest.mark.parametrize(("fixture", "kind", "starts"), [
    ("text_received", "text_received", "text message"),
    ("text_received", "text_sent", "text message"),
    ("form_submission", "form_submission", "form submission"),
    ("convert_assist", "post_call", "Convert Assist"),
    ("convert_assist", "call_modified", "Convert Assist"),
    # Shape beats a wrong ?event= value.
    ("form_submission", "post_call", "form submission"),
    ("text_received", "post_call", "text message"),
])
def test_non_call_bodies_are_skipped(fixture: str, kind: str, starts: str) -> None:
    assert skip_reason(parse_event("callrail", kind, load("callrail", fixture))).startswith(starts)


def test_missing_call_id_is_a_transform_error() -> None:
    raw = load("callrail", "post_call")
    del raw["resource_id"]
    with pytest.raises(TransformError,
                       match="no usable call id: resource_id missing and legacy id missing"):
        parse_event("callrail", "post_call", raw)


def test_unsafe_call_id_is_refused() -> None:
    raw = load("callrail", "post_call")
    raw["resource_id"] = "CAL/../../x"
    with pytest.raises(TransformError, match=r"resource_id 'CAL/\.\./\.\./x'"):
        parse_event("callrail", "post_call", raw)


def test_unknown_kind_and_source_and_non_object() -> None:
    with pytest.raises(TransformError, match="unknown CallRail event kind 'call_started'"):
        parse_event("callrail", "call_started", load("callrail", "post_call"))
    with pytest.raises(TransformError, match="unknown source 'twilio'"):
        parse_event("twilio", "post_call", load("callrail", "post_call"))
    with pytest.raises(TransformError, match="expected a JSON object"):
        parse_event("callrail", "post_call", [1, 2])  # type: ignore[arg-type]


def test_skip_is_a_value() -> None:
    assert parse_event("callrail", "text_sent", {}) == Skip(
        "text message sent: texts carry no call recording")
