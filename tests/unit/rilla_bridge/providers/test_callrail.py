"""CallRail's webhooks: the signature, the event kinds, the call id, the API recording URL and
the call schema (``rilla_bridge.providers.callrail``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from rilla_bridge.providers import parse_event
from rilla_bridge.providers.callrail import (
    KINDS,
    UNKEPT_KINDS,
    call_id,
    detect_kind,
    kind_of,
    recording_api_call,
    signature,
    signature_ok,
)
from rilla_bridge.transform.model import Skip, TransformError
from tests.fakes import FIXTURES, load, skip_reason, snap

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
    for key in ("answered", "duration", "duration_invalid", "spam", "recording", "voicemail"):
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


def test_unknown_kind_and_non_object() -> None:
    with pytest.raises(TransformError, match="unknown CallRail event kind 'call_started'"):
        parse_event("callrail", "call_started", load("callrail", "post_call"))
    with pytest.raises(TransformError, match="expected a JSON object"):
        parse_event("callrail", "post_call", [1, 2])  # type: ignore[arg-type]


def test_skip_is_a_value() -> None:
    assert parse_event("callrail", "text_sent", {}) == Skip(
        "text message sent: texts carry no call recording")


# -- the published signature test vector ------------------------------------------------------
VECTOR_KEY = "072e77e426f92738a72fe23c4d1953b4"
VECTOR_SIGNATURE = "UZAHbUdfm3GqL7qzilGozGzWV64="
VECTOR_SHA256 = "4c08427068fb350b43abc01ec131501ca0548945d483886f1a48c9937bef961a"


@pytest.fixture(scope="module")
def vector_body() -> bytes:
    raw = (FIXTURES / "callrail" / "signature_vector.body").read_bytes()
    assert len(raw) == 2279
    assert not raw.endswith(b"\n")
    assert hashlib.sha256(raw).hexdigest() == VECTOR_SHA256
    return raw


def test_vector_signature_function(vector_body: bytes) -> None:
    assert signature(VECTOR_KEY, vector_body) == VECTOR_SIGNATURE
    assert signature_ok((VECTOR_KEY,), vector_body, VECTOR_SIGNATURE)


@pytest.mark.parametrize("header", [VECTOR_SIGNATURE, f" {VECTOR_SIGNATURE} ",
                                    f"{VECTOR_SIGNATURE}\t"])
def test_surrounding_whitespace_in_the_header_is_ignored(vector_body: bytes,
                                                         header: str) -> None:
    assert signature_ok((VECTOR_KEY,), vector_body, header)


@pytest.mark.parametrize("header", [
    None, "", "   ", "not-base64", VECTOR_SIGNATURE.lower(), VECTOR_SIGNATURE[:-1],
    VECTOR_SIGNATURE + "A", "5190076d475f9b71aa2fbab38a51a8cc6cd657ae",   # the hex digest
    "UZAHbUdfm3GqL7qzilGozGzWV64=\u00e9",
])
def test_missing_or_wrong_header_is_refused(vector_body: bytes, header: str | None) -> None:
    assert not signature_ok((VECTOR_KEY,), vector_body, header)


def test_the_key_is_used_as_its_literal_string_not_hex_decoded(vector_body: bytes) -> None:
    decoded = base64.b64encode(
        hmac.new(bytes.fromhex(VECTOR_KEY), vector_body, hashlib.sha1).digest()).decode()
    assert decoded != VECTOR_SIGNATURE
    assert not signature_ok((VECTOR_KEY,), vector_body, decoded)
    assert not signature_ok(("other-key-000000",), vector_body, VECTOR_SIGNATURE)


def test_any_change_of_the_body_is_refused(vector_body: bytes) -> None:
    positions = sorted({0, 1, len(vector_body) - 1, *range(0, len(vector_body), 23)})
    for pos in positions:
        for delta in (1, 0x80):
            changed = bytearray(vector_body)
            changed[pos] = (changed[pos] + delta) % 256
            assert not signature_ok((VECTOR_KEY,), bytes(changed), VECTOR_SIGNATURE), (
                pos, delta)
    for raw in (vector_body[:-1], vector_body[1:], b" " + vector_body, vector_body + b"\n"):
        assert not signature_ok((VECTOR_KEY,), raw, VECTOR_SIGNATURE)


def test_every_changed_signature_character_is_refused(vector_body: bytes) -> None:
    for i, c in enumerate(VECTOR_SIGNATURE):
        bad = VECTOR_SIGNATURE[:i] + ("A" if c != "A" else "B") + VECTOR_SIGNATURE[i + 1:]
        assert not signature_ok((VECTOR_KEY,), vector_body, bad), bad


# -- a key being rotated: either of two verifies ------------------------------------------------
@pytest.mark.parametrize("keys", [(VECTOR_KEY, "the-new-signing-key-01"),
                                  ("the-old-signing-key-01", VECTOR_KEY)])
def test_either_key_of_a_rotation_verifies(vector_body: bytes, keys: tuple[str, str]) -> None:
    assert signature_ok(keys, vector_body, VECTOR_SIGNATURE)
    assert signature_ok(keys, vector_body, signature("the-new-signing-key-01", vector_body)) == (
        "the-new-signing-key-01" in keys)


def test_no_key_verifies_nothing(vector_body: bytes) -> None:
    assert not signature_ok((), vector_body, VECTOR_SIGNATURE)
    assert not signature_ok(("the-old-signing-key-01", "the-new-signing-key-01"), vector_body,
                            VECTOR_SIGNATURE)


# -- kinds ------------------------------------------------------------------------------------
def test_kinds_are_the_documented_event_values() -> None:
    assert frozenset({
        "pre_call", "call_routing_complete", "post_call", "call_modified", "outbound_post_call",
        "outbound_call_modified", "text_received", "text_sent", "form_submission",
    }) == KINDS
    assert frozenset() == UNKEPT_KINDS   # every CallRail body is kept


@pytest.mark.parametrize(("body", "kind"), [
    ({"resource_id": "C1", "changes": {"tags": []}}, "call_modified"),
    ({"resource_id": "C1", "changes": {}, "content": "x", "form_data": {}}, "call_modified"),
    ({"resource_id": "T1", "content": "hi"}, "text_received"),
    ({"resource_id": "T1", "content": "hi", "agent": {"id": 1}}, "text_sent"),
    ({"id": 5, "form_data": {"name": "x"}}, "form_submission"),
    ({"resource_id": "C2", "answered": "true"}, "post_call"),
    ({}, "post_call"),
])
def test_kind_from_shape(body: dict[str, Any], kind: str) -> None:
    assert detect_kind(body) == kind


@pytest.mark.parametrize(("claimed", "body", "kind"), [
    ("post_call", {"resource_id": "C1", "changes": {}}, "post_call"),       # the URL decides
    ("call_modified", {"resource_id": "C1"}, "call_modified"),
    (None, {"resource_id": "C1", "changes": {}}, "call_modified"),          # else the shape
    ("", {"resource_id": "T1", "content": "hi"}, "text_received"),
    (None, {}, "post_call"),
])
def test_kind_of_takes_the_event_param_else_the_shape(claimed: str | None,
                                                      body: dict[str, Any], kind: str) -> None:
    assert kind_of(claimed, body) == kind


@pytest.mark.parametrize(("fixture", "kind"), [
    ("post_call", "post_call"), ("legacy_post_call", "post_call"),
    ("call_modified_spam", "call_modified"), ("call_modified_recording", "call_modified"),
    ("form_submission", "form_submission"), ("text_received", "text_received"),
])
def test_kind_of_the_real_bodies(fixture: str, kind: str) -> None:
    assert detect_kind(load("callrail", fixture)) == kind


# -- the call id intake records ---------------------------------------------------------------
@pytest.mark.parametrize(("body", "expected"), [
    ({"resource_id": "CAL1", "id": 99}, "CAL1"),           # resource_id wins
    ({"id": 766970532}, "766970532"),                     # legacy numeric id
    ({"resource_id": "", "id": "CAL2"}, "CAL2"),
    ({"resource_id": True}, None), ({"id": False}, None),
    ({"resource_id": {"x": 1}}, None), ({"id": [1]}, None), ({"id": 1.5}, None),
    ({}, None), ({"resource_id": None}, None),
    ({"resource_id": "x" * 300}, "x" * 100),              # bounded
    ({"resource_id": "CAL\ud800x"}, "CAL?x"),             # a lone surrogate is not UTF-8
])
def test_call_id(body: dict[str, Any], expected: str | None) -> None:
    got = call_id("post_call", body)
    assert got == expected
    if got is not None:
        got.encode("utf-8")   # storable as UTF-8, whatever JSON escaped


def test_call_id_of_the_signature_vector_is_the_legacy_id(vector_body: bytes) -> None:
    assert call_id("post_call", json.loads(vector_body)) == "766970532"


# -- the API recording URL --------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.callrail.com/v3/a/318/calls/CALabc/recording.json", ("318", "CALabc")),
    ("http://127.0.0.1:9000/v3/a/111/calls/CALx/recording.json", ("111", "CALx")),
    (" https://api.callrail.com/v3/a/318/calls/CALabc/recording.json ", ("318", "CALabc")),
    ("https://api.callrail.com/v3/a/318/calls/CALabc/recording.json?x=1", ("318", "CALabc")),
    ("https://app.callrail.com/calls/CALabc/recording/redirect?access_key=x", None),
    ("https://api.callrail.com/v3/a/318/calls/CALabc.json", None),
    ("https://api.callrail.com/v3/a/318/calls/a/b/recording.json", None),
    ("ftp://api.callrail.com/v3/a/318/calls/CALabc/recording.json", None),   # http(s) only
    ("file:///v3/a/318/calls/CALabc/recording.json", None),
    ("/v3/a/318/calls/CALabc/recording.json", None),                        # no scheme
    ("http://[::1/v3/a/318/calls/CALabc/recording.json", None),             # unparsable
    ("", None), (None, None), (42, None),
])
def test_recording_api_call(url: Any, expected: tuple[str, str] | None) -> None:
    assert recording_api_call(url) == expected


# -- durations: whole seconds, or the bad value kept by name ----------------------------------
@pytest.mark.parametrize(("duration", "seconds", "invalid"), [
    ("312", 312, None), (95.5, 96, None), ("95.5", 96, None), (95.4, 95, None), (0, 0, None),
    ("86400", 86400, None), ("", None, None), (None, None, None),
    ("1e9", None, "'1e9'"), ("-5", None, "'-5'"), (-5, None, "-5"), ("86401", None, "'86401'"),
    ("4m 7s", None, "'4m 7s'"), (10 ** 12, None, "1000000000000"),
])
def test_duration_is_rounded_or_kept_as_invalid(duration: Any, seconds: int | None,
                                                invalid: str | None) -> None:
    raw = {**load("callrail", "post_call"), "duration": duration}
    f = snap("callrail", "post_call", raw).fields
    assert (f["duration"], f["duration_invalid"]) == (seconds, invalid)
