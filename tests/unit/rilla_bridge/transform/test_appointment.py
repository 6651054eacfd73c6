from __future__ import annotations

import copy
from typing import Any

import pytest

from rilla_bridge.transform.appointment import validate_appointment
from rilla_bridge.transform.model import TransformError


def _payload(**changes: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "event_id": "callrail-CAL1",
        "user_email": "rep@acme.example",
        "start_time": "2025-04-02 16:03:12",
        "end_time": "2025-04-02 16:08:24",
        "title": "Inbound call with Jordan Pike",
        "customer": {"id": "PER1", "name": "Jordan Pike"},
        "media_url": "https://app.callrail.com/calls/CAL1/recording/redirect?access_key=x",
        "recording_type": "CALL_AUDIO",
        "custom_fields": {"direction": "inbound"},
    }
    p.update(changes)
    return p


def test_a_complete_payload_passes() -> None:
    validate_appointment(_payload())


@pytest.mark.parametrize("field", ["event_id", "user_email", "start_time", "end_time", "title",
                                   "customer"])
def test_create_fields_are_required(field: str) -> None:
    p = _payload()
    del p[field]
    with pytest.raises(TransformError, match=f"{field}: Missing data for required field"):
        validate_appointment(p)


@pytest.mark.parametrize("field", ["id", "name"])
def test_customer_id_and_name_are_required(field: str) -> None:
    p = _payload()
    del p["customer"][field]
    with pytest.raises(TransformError, match=f"customer.{field}: Missing data"):
        validate_appointment(p)


@pytest.mark.parametrize("value", ["2025-04-02T16:03:12", "2025-4-2 16:03:12",
                                   "2025-04-02 16:03:12-05:00", "2025-02-30 10:00:00"])
def test_time_format_is_enforced(value: str) -> None:
    with pytest.raises(TransformError, match=r"start_time: .* is not a UTC time"):
        validate_appointment(_payload(start_time=value))


def test_end_before_start_is_refused() -> None:
    with pytest.raises(TransformError, match="end_time is before start_time"):
        validate_appointment(_payload(end_time="2025-04-02 16:00:00"))


def test_media_url_requires_recording_type() -> None:
    p = _payload()
    del p["recording_type"]
    with pytest.raises(TransformError, match="media_url requires recording_type"):
        validate_appointment(p)


def test_recording_type_enum_and_location_rule() -> None:
    with pytest.raises(TransformError, match="recording_type: Must be one of"):
        validate_appointment(_payload(recording_type="VIDEO"))
    with pytest.raises(TransformError, match="requires location"):
        validate_appointment(_payload(recording_type="CALL_AUDIO_WITH_LOCATION"))
    validate_appointment(_payload(recording_type="CALL_AUDIO_WITH_LOCATION", location="Denver"))


def test_media_url_must_be_http() -> None:
    with pytest.raises(TransformError, match="media_url"):
        validate_appointment(_payload(media_url="ftp://x.example/a.mp3"))


def test_user_email_must_be_an_email() -> None:
    with pytest.raises(TransformError, match="user_email: Not a valid email"):
        validate_appointment(_payload(user_email="Dana Whitfield"))


def test_custom_field_values_are_plain() -> None:
    with pytest.raises(TransformError, match="custom_fields"):
        validate_appointment(_payload(custom_fields={"tags": ["a"]}))


def test_custom_field_over_2000_characters_is_named() -> None:
    p = _payload(custom_fields={"campaign": "x" * 2001})
    with pytest.raises(TransformError) as exc:
        validate_appointment(p)
    assert str(exc.value) == "custom field 'campaign' is 2001 characters (limit 2000)"
    validate_appointment(_payload(custom_fields={"campaign": "x" * 2000}))


def test_payload_over_64_kib_is_refused() -> None:
    fields = {f"f{i}": "x" * 1900 for i in range(40)}
    with pytest.raises(TransformError, match=r"payload is \d+ bytes \(limit 65536\)"):
        validate_appointment(_payload(custom_fields=fields))


def test_unknown_fields_are_a_bug_not_sent() -> None:
    with pytest.raises(TransformError, match="colour: Unknown field"):
        validate_appointment(_payload(colour="red"))


def test_validation_does_not_change_the_payload() -> None:
    p = _payload()
    before = copy.deepcopy(p)
    validate_appointment(p)
    assert p == before
