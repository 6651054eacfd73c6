from __future__ import annotations

from typing import Any

import pytest

from rilla_bridge.transform.build import build_action
from rilla_bridge.transform.model import (
    Delete,
    NeedsRecording,
    TransformError,
    Upsert,
    event_id_for,
)
from tests.fakes import action_for, load, skip_reason, tenant

CAL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"
API_CAL = "CAL5e9b1d3f7a0c42e8b6d4f2a0c8e6b4d2f0"
API_URL = f"https://api.callrail.com/v3/a/227799611/calls/{API_CAL}/recording.json"


def upsert(result: object) -> dict[str, Any]:
    assert isinstance(result, Upsert), result
    return result.payload


def test_event_ids_are_fixed() -> None:
    assert event_id_for("callrail", CAL) == f"callrail-{CAL}"
    assert event_id_for("callingly", "41872219") == "callingly-41872219"


def test_callrail_post_call_maps_to_the_spec_table() -> None:
    p = upsert(action_for("callrail", [("post_call", load("callrail", "post_call"))]))
    assert p == {
        "event_id": f"callrail-{CAL}",
        "user_email": "mike.r@acme.example",   # "Mike@Acme.example" through users, any case
        "start_time": "2025-04-02 16:03:12",
        "end_time": "2025-04-02 16:08:24",       # + 312 s
        "title": "Inbound call with Jordan Pike",
        "customer": {"id": "PER1f6a2d9c4b8e47a0b5c3e8d7f6a29b10", "name": "Jordan Pike",
                     "phone": "+17205550139", "address": "Lakewood, CO"},
        "lead_source": "Website Pool",
        "custom_fields": {"direction": "inbound", "duration": 312,
                          "tracking_number": "+13035550118", "tags": "new-customer, roof-repair",
                          "campaign": "Spring Promo", "answered": True},
        "media_url": load("callrail", "post_call")["recording"],
        "recording_type": "CALL_AUDIO",
    }


def test_unmapped_agent_email_is_used_as_is() -> None:
    body = load("callrail", "outbound_post_call")
    p = upsert(action_for("callrail", [("outbound_post_call", body)]))
    assert p["user_email"] == "dana.whitfield@hillcountryroofing.example"
    assert p["custom_fields"]["answered"] is True
    assert "value" not in p["custom_fields"] and "campaign" not in p["custom_fields"]


def test_lead_source_falls_back_to_source() -> None:
    raw = load("callrail", "post_call")
    raw["source_name"] = ""
    assert upsert(action_for("callrail", [("post_call", raw)]))["lead_source"] == "Google Organic"


def test_customer_falls_back_to_phone_for_id_and_name() -> None:
    raw = load("callrail", "legacy_post_call")
    raw.update(customer_name="", callername="")
    p = upsert(action_for("callrail", [("post_call", raw)]))
    assert p["customer"]["id"] == "+12148650177"
    assert p["customer"]["name"] == "+12148650177"
    assert "+12148650177" in p["title"]


def test_place_name_gives_a_phone_title() -> None:
    p = upsert(action_for("callrail", [
        ("post_call", load("callrail", "post_call_no_recording")),
        ("call_modified", load("callrail", "call_modified_recording")),
    ]))
    assert p["title"] == "Inbound call with +19495550176"
    assert p["customer"]["address"] == "Laguna Beach, CA"
    assert p["custom_fields"]["value"] == "350.00"


def test_spam_deletes_the_appointment() -> None:
    result = action_for("callrail", [
        ("post_call", load("callrail", "post_call")),
        ("call_modified", load("callrail", "call_modified_spam")),
    ], t=tenant(default_user_email=None, users={}))
    assert result == Delete(f"callrail-{CAL}")


def test_unmarking_spam_upserts_again() -> None:
    unspam = load("callrail", "call_modified_spam")
    unspam["spam"] = False
    result = action_for("callrail", [("call_modified", load("callrail", "call_modified_spam")),
                                     ("call_modified", unspam)])
    assert isinstance(result, Upsert)


def test_api_recording_needs_resolving_first() -> None:
    result = action_for("callrail", [("api_call", load("callrail", "api_call"))])
    assert result == NeedsRecording(api_url=API_URL, account_id="227799611", call_id=API_CAL)


def test_resolved_api_recording_is_the_media_url() -> None:
    resolved = {API_URL: "https://app.callrail.com/calls/X/recording/redirect?access_key=abc"}
    p = upsert(action_for("callrail", [("api_call", load("callrail", "api_call"))],
                          resolved=resolved))
    assert p["media_url"] == resolved[API_URL]
    assert p["recording_type"] == "CALL_AUDIO"
    assert p["custom_fields"]["tags"] == "estimate-booked, gutters"


def test_api_recording_on_any_host_is_recognised() -> None:
    raw = load("callrail", "api_call")
    raw["recording"] = f"http://127.0.0.1:9000/v3/a/111/calls/{API_CAL}/recording.json"
    result = action_for("callrail", [("api_call", raw)])
    assert isinstance(result, NeedsRecording) and result.account_id == "111"


def test_bad_payload_is_reported_before_spending_a_recording_lookup() -> None:
    raw = load("callrail", "api_call")
    raw["agent_email"] = None
    with pytest.raises(TransformError, match="no rep email"):
        action_for("callrail", [("api_call", raw)], t=tenant(default_user_email=None))


def test_no_recording_is_skipped_with_a_reason() -> None:
    body = load("callrail", "post_call_no_recording")
    reason = skip_reason(action_for("callrail", [("post_call", body)]))
    assert reason.startswith("no recording")
    assert "CAL3b7e90d1a4c24f6b8e5a0d2c9f1b7e38" in reason


def test_unrecorded_unanswered_call_is_skipped_not_dead_lettered() -> None:
    raw = load("callrail", "post_call_no_recording")
    raw["agent_email"] = ""
    result = action_for("callrail", [("post_call", raw)], t=tenant(default_user_email=None))
    assert skip_reason(result).startswith("no recording")


def test_deliver_unrecorded_sends_without_media() -> None:
    p = upsert(action_for("callrail", [("post_call", load("callrail", "post_call_no_recording"))],
                          t=tenant(deliver_unrecorded=True)))
    assert "media_url" not in p and "recording_type" not in p
    assert p["user_email"] == "office@acme.example"


def test_pre_call_alone_is_skipped_until_the_call_ends() -> None:
    result = action_for("callrail", [("pre_call", load("callrail", "pre_call"))])
    assert skip_reason(result).startswith("no recording")


def test_no_rep_email_names_the_tenant() -> None:
    raw = load("callrail", "post_call")
    raw["agent_email"] = ""
    with pytest.raises(TransformError) as exc:
        action_for("callrail", [("post_call", raw)], t=tenant(default_user_email=None))
    assert str(exc.value) == ("no rep email: the call has no agent_email and tenant acme "
                              "has no default_user_email")


def test_default_user_email_is_the_fallback() -> None:
    raw = load("callrail", "post_call")
    raw["agent_email"] = ""
    p = upsert(action_for("callrail", [("post_call", raw)]))
    assert p["user_email"] == "office@acme.example"


def test_bad_start_time_is_named() -> None:
    raw = load("callrail", "post_call")
    raw["start_time"] = "2025-13-45"
    del raw["datetime"]
    with pytest.raises(TransformError) as exc:
        action_for("callrail", [("post_call", raw)])
    assert str(exc.value) == ("no usable start time: start_time '2025-13-45' is not ISO 8601 "
                              "with an offset")


def test_later_good_start_time_repairs_a_bad_one() -> None:
    bad = load("callrail", "post_call")
    bad["start_time"] = "2025-13-45"
    del bad["datetime"]
    p = upsert(action_for("callrail", [("post_call", bad),
                                       ("call_modified", load("callrail", "call_modified_spam") | {
                                           "spam": False})]))
    assert p["start_time"] == "2025-04-02 16:03:12"


def test_missing_start_time_is_named() -> None:
    raw = load("callrail", "post_call")
    del raw["start_time"], raw["datetime"]
    with pytest.raises(TransformError, match="no usable start time: the call has no start_time"):
        action_for("callrail", [("post_call", raw)])


def test_absurd_duration_is_named_not_a_crash() -> None:
    raw = load("callrail", "post_call")
    raw["duration"] = "999999999999"
    with pytest.raises(TransformError, match="no usable end time: start '2025-04-02 16:03:12' "
                                             "plus duration 999999999999 seconds"):
        action_for("callrail", [("post_call", raw)])


def test_no_customer_id_is_named() -> None:
    raw = load("callrail", "legacy_post_call")
    raw.update(customer_phone_number="", callernum="")
    with pytest.raises(TransformError, match="no customer id: the call has neither "
                                             "person_resource_id nor customer_phone_number"):
        action_for("callrail", [("post_call", raw)])


def test_huge_custom_field_is_refused_by_name() -> None:
    raw = load("callrail", "post_call")
    raw["tags"] = [f"tag-{i:05d}" for i in range(400)]
    with pytest.raises(TransformError, match=r"custom field 'tags' is 4\d{3} characters "
                                             r"\(limit 2000\)"):
        action_for("callrail", [("post_call", raw)])


def test_unknown_source_is_an_error() -> None:
    with pytest.raises(TransformError, match="unknown source 'twilio'"):
        build_action("twilio", "1", {}, tenant(), {})


def test_callingly_call_completed_maps_to_the_spec_table() -> None:
    p = upsert(action_for("callingly", [("call_completed", load("callingly", "call_completed"))]))
    assert p == {
        "event_id": "callingly-41872219",
        "user_email": "dana@sunvalleyroofing.example",
        "start_time": "2025-03-11 16:42:17",
        "end_time": "2025-03-11 16:46:40",
        "title": "Outbound call with Marcus Bell",
        "customer": {"id": "7730452", "name": "Marcus Bell", "email": "marcus.bell@example.com",
                     "phone": "+16025550148"},
        "lead_source": "Facebook Lead Ads",
        "custom_fields": {"team": "Inbound Leads", "direction": "outbound", "status": "completed",
                          "result": "contacted", "tags": "Appointment Set"},
        "media_url": "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3",
        "recording_type": "CALL_AUDIO",
    }


def test_callingly_user_null_falls_back_to_default_user_email() -> None:
    raw = load("callingly", "call_completed")
    raw["user"] = None
    p = upsert(action_for("callingly", [("call_completed", raw)]))
    assert p["user_email"] == "office@acme.example"


def test_callingly_missed_call_is_skipped_or_delivered_unrecorded() -> None:
    raw = load("callingly", "call_completed_missed")
    assert skip_reason(action_for("callingly", [("call_completed", raw)])).startswith(
        "no recording: Callingly call 41872305")
    t = tenant(deliver_unrecorded=True)
    p = upsert(action_for("callingly", [("call_completed", raw)], t=t))
    assert p["user_email"] == "office@acme.example"
    assert p["customer"] == {"id": "7731988", "name": "+5511955550142", "phone": "+5511955550142"}
    assert p["end_time"] == p["start_time"] == "2026-01-29 21:02:05"
    assert "result" not in p["custom_fields"]
    assert "media_url" not in p


def test_callingly_users_mapping_is_case_insensitive() -> None:
    raw = load("callingly", "call_completed")
    raw["user"]["email"] = "  DANA@SunValleyRoofing.example "
    t = tenant(users={"dana@sunvalleyroofing.example": "dana.w@sunvalley.example"})
    assert upsert(action_for("callingly", [("call_completed", raw)], t=t))["user_email"] == (
        "dana.w@sunvalley.example")


def test_callingly_without_lead_has_no_customer_id() -> None:
    raw = load("callingly", "call_completed")
    raw["lead"] = None
    with pytest.raises(TransformError, match="no customer id: the Callingly call has no lead id"):
        action_for("callingly", [("call_completed", raw)])


def test_callingly_bad_datetime_is_named() -> None:
    raw = load("callingly", "call_completed")
    raw["datetime"] = "2025-03-11T09:42:17"
    with pytest.raises(TransformError, match="datetime '2025-03-11T09:42:17' is not ISO 8601 "
                                             "with an offset"):
        action_for("callingly", [("call_completed", raw)])


def test_callingly_malformed_lead_email_is_dropped_not_fatal() -> None:
    raw = load("callingly", "call_completed")
    raw["lead"]["email"] = "marcus at example"
    p = upsert(action_for("callingly", [("call_completed", raw)]))
    assert "email" not in p["customer"]


def test_callingly_is_never_deleted_for_spam() -> None:
    raw = load("callingly", "call_completed")
    raw["spam"] = True
    assert isinstance(action_for("callingly", [("call_completed", raw)]), Upsert)
