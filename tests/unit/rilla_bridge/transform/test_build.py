from __future__ import annotations

from typing import Any

import pytest

from rilla_bridge.tenants import CallRailConfig, Tenant
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


@pytest.mark.parametrize(("duration", "shown"), [
    ("999999999999", "'999999999999'"), ("1e9", "'1e9'"), ("-5", "'-5'"), (-5, "-5"),
    ("86401", "'86401'"), ("5 minutes", "'5 minutes'"),
])
def test_an_unusable_duration_is_delivered_with_end_at_start_and_a_note(duration: Any,
                                                                        shown: str) -> None:
    raw = {**load("callrail", "post_call"), "duration": duration}
    result = action_for("callrail", [("post_call", raw)])
    p = upsert(result)
    assert p["start_time"] == p["end_time"] == "2025-04-02 16:03:12"
    assert "duration" not in p["custom_fields"]
    assert isinstance(result, Upsert) and result.notes == (
        f"duration {shown} is not a number of seconds (0 to a day): the end time is the "
        "start time",)


def test_a_fractional_duration_is_rounded() -> None:
    result = action_for("callrail", [("post_call", {**load("callrail", "post_call"),
                                                    "duration": 95.5})])
    p = upsert(result)
    assert p["end_time"] == "2025-04-02 16:04:48"           # + 96 s
    assert p["custom_fields"]["duration"] == 96
    assert isinstance(result, Upsert) and result.notes == ()


def test_a_later_good_duration_needs_no_note() -> None:
    bad = {**load("callrail", "post_call"), "duration": "1e9"}
    good = {**load("callrail", "call_modified_spam"), "spam": False, "duration": "312"}
    result = action_for("callrail", [("post_call", bad), ("call_modified", good)])
    assert upsert(result)["end_time"] == "2025-04-02 16:08:24"
    assert isinstance(result, Upsert) and result.notes == ()


def test_an_end_time_past_the_calendar_is_named_not_a_crash() -> None:
    raw = {**load("callrail", "post_call"), "start_time": "9999-12-31T23:59:00+00:00",
           "duration": "312"}
    with pytest.raises(TransformError, match="no usable end time: start '9999-12-31 23:59:00' "
                                             "plus duration 312 seconds is out of range"):
        action_for("callrail", [("post_call", raw)])


def test_no_customer_id_is_named() -> None:
    raw = load("callrail", "legacy_post_call")
    raw.update(customer_phone_number="", callernum="")
    with pytest.raises(TransformError, match="no customer id: the call has neither "
                                             "person_resource_id nor customer_phone_number"):
        action_for("callrail", [("post_call", raw)])


def test_a_huge_custom_field_is_shortened_with_a_note_not_refused() -> None:
    raw = load("callrail", "post_call")
    raw["tags"] = [f"tag-{i:05d}" for i in range(400)]
    raw["campaign"] = "c" * 2000                                 # exactly the limit: kept
    result = action_for("callrail", [("post_call", raw)])
    custom = upsert(result)["custom_fields"]
    full = ", ".join(raw["tags"])
    assert len(full) == 4398
    assert custom["tags"] == full[:1999] + "…" and len(custom["tags"]) == 2000
    assert custom["campaign"] == "c" * 2000
    assert isinstance(result, Upsert) and result.notes == (
        "custom field 'tags' shortened from 4398 characters to 2000",)


def test_every_shortened_field_is_noted() -> None:
    raw = {**load("callrail", "post_call"), "campaign": "x" * 3000, "value": "v" * 2001}
    result = action_for("callrail", [("post_call", raw)])
    assert isinstance(result, Upsert) and result.notes == (
        "custom field 'campaign' shortened from 3000 characters to 2000",
        "custom field 'value' shortened from 2001 characters to 2000")


def test_an_ordinary_call_has_no_notes() -> None:
    result = action_for("callrail", [("post_call", load("callrail", "post_call"))])
    assert isinstance(result, Upsert) and result.notes == ()


# -- the rep: an invalid agent email falls back to the tenant's default ----------------------
@pytest.mark.parametrize("agent", ["not an email", "mike at acme", "@acme.example", "a@b"])
def test_an_invalid_agent_email_falls_back_to_the_default_with_a_note(agent: str) -> None:
    raw = {**load("callrail", "post_call"), "agent_email": agent}
    result = action_for("callrail", [("post_call", raw)])
    assert upsert(result)["user_email"] == "office@acme.example"
    assert isinstance(result, Upsert) and result.notes == (
        f"agent_email {agent!r} is not an email address: the call goes to the tenant's "
        "default_user_email",)


def test_a_users_mapping_to_an_invalid_email_falls_back_too() -> None:
    raw = {**load("callrail", "post_call"), "agent_email": "mike@acme.example"}
    t = tenant(users={"mike@acme.example": "Mike R."})
    result = action_for("callrail", [("post_call", raw)], t=t)
    assert upsert(result)["user_email"] == "office@acme.example"
    assert isinstance(result, Upsert) and "'Mike R.'" in result.notes[0]


def test_an_invalid_agent_email_without_a_default_is_named() -> None:
    raw = {**load("callrail", "post_call"), "agent_email": "not an email"}
    with pytest.raises(TransformError) as exc:
        action_for("callrail", [("post_call", raw)], t=tenant(default_user_email=None))
    assert str(exc.value) == ("no rep email: agent_email 'not an email' is not an email "
                              "address and tenant acme has no default_user_email")


# -- recording URLs: https on public hosts, or a host the tenant lists ------------------------
def _with_recording(url: str, t: Tenant | None = None) -> object:
    raw = {**load("callrail", "post_call"), "recording": url}
    return action_for("callrail", [("post_call", raw)], t=t)


@pytest.mark.parametrize("url", [
    "https://app.callrail.com/calls/CAL1/recording/redirect?access_key=abc",
    "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3",
    "https://8.8.8.8/r.mp3", "https://[2001:4860:4860::8888]/r.mp3",
    "https://media.example.com:8443/r.mp3", "HTTPS://Media.Example.COM/r.mp3",
])
def test_https_recordings_on_public_hosts_are_sent(url: str) -> None:
    assert upsert(_with_recording(url))["media_url"] == url


@pytest.mark.parametrize(("url", "why"), [
    ("http://app.callrail.com/r.mp3", "is http http(s), not https"),
    ("ftp://files.example.com/r.mp3", "is ftp http(s), not https"),
    ("file:///etc/passwd", "is file http(s), not https"),
    ("//media.example.com/r.mp3", "is not http(s), not https"),
    ("https:///r.mp3", "has no host"),
    ("https://169.254.169.254/latest/meta-data/", "names the non-public address 169.254.169.254"),
    ("https://127.0.0.1/r.mp3", "names the non-public address 127.0.0.1"),
    ("https://10.0.0.7/r.mp3", "names the non-public address 10.0.0.7"),
    ("https://192.168.1.10/r.mp3", "names the non-public address 192.168.1.10"),
    ("https://100.64.0.1/r.mp3", "names the non-public address 100.64.0.1"),
    ("https://0.0.0.0/r.mp3", "names the non-public address 0.0.0.0"),
    ("https://[::1]/r.mp3", "names the non-public address ::1"),
    ("https://[fe80::1]/r.mp3", "names the non-public address fe80::1"),
    ("https://[fd00::5]/r.mp3", "names the non-public address fd00::5"),
    ("https://[::ffff:169.254.169.254]/r.mp3",
     "names the non-public address ::ffff:169.254.169.254"),
    ("https://localhost/r.mp3", "names the internal host 'localhost'"),
    ("https://LocalHost:8443/r.mp3", "names the internal host 'localhost'"),
    ("https://user:pw@localhost/r.mp3", "names the internal host 'localhost'"),
    ("https://api.localhost/r.mp3", "names the internal host 'api.localhost'"),
    ("https://nas.local/r.mp3", "names the internal host 'nas.local'"),
    ("https://media.corp.internal/r.mp3", "names the internal host 'media.corp.internal'"),
    ("https://router.home.arpa/r.mp3", "names the internal host 'router.home.arpa'"),
    ("https://recordings/r.mp3", "names the internal host 'recordings'"),
    # the same hosts spelt otherwise: a final dot, the older IPv4 forms clients still resolve
    ("https://localhost./r.mp3", "names the internal host 'localhost'"),
    ("https://nas.local./r.mp3", "names the internal host 'nas.local'"),
    ("https://169.254.169.254./latest/", "names the non-public address 169.254.169.254"),
    ("https://127.1/r.mp3", "names the non-public address 127.1"),
    ("https://0x7f.1/r.mp3", "names the non-public address 0x7f.1"),
    ("https://0177.0.0.1/r.mp3", "names the non-public address 0177.0.0.1"),
    ("https://2130706433/r.mp3", "names the non-public address 2130706433"),
    ("https://0xa9fea9fe/latest/", "names the non-public address 0xa9fea9fe"),
])
def test_recordings_elsewhere_are_refused_by_name(url: str, why: str) -> None:
    with pytest.raises(TransformError) as exc:
        _with_recording(url)
    assert str(exc.value) == (f"recording URL {why}: only https URLs on public hosts are sent "
                              "to Rilla (add the host to the tenant's recording_hosts if it is "
                              "right)")


@pytest.mark.parametrize("url", ["https://media.corp.internal/r.mp3",
                                 "http://media.corp.internal:8080/r.mp3",
                                 "https://10.0.0.7/r.mp3", "https://Media.Corp.Internal./r.mp3"])
def test_a_host_the_tenant_lists_is_allowed(url: str) -> None:
    t = tenant(recording_hosts=("media.corp.internal", "10.0.0.7"))
    assert upsert(_with_recording(url, t))["media_url"] == url


def test_a_listed_host_still_needs_http() -> None:
    t = tenant(recording_hosts=("media.corp.internal",))
    with pytest.raises(TransformError, match="recording URL is not http"):
        _with_recording("ftp://media.corp.internal/r.mp3", t)
    with pytest.raises(TransformError, match=r"internal host 'other\.internal'"):
        _with_recording("https://other.internal/r.mp3", t)


def test_a_resolved_api_recording_is_checked_too() -> None:
    resolved = {API_URL: "https://169.254.169.254/latest/meta-data/"}
    with pytest.raises(TransformError, match=r"non-public address 169\.254\.169\.254"):
        action_for("callrail", [("api_call", load("callrail", "api_call"))], resolved=resolved)


# -- an API recording.json URL: only the event's own call, in the tenant's own account -------
def _api_tenant(account: str = "227799611") -> Tenant:
    return tenant(callrail=CallRailConfig(signing_keys=("acme-signing-key-0001",),
                                          account_id=account, api_key="agency-api-key-000003"))


def test_the_own_call_in_the_own_account_is_looked_up() -> None:
    result = action_for("callrail", [("api_call", load("callrail", "api_call"))],
                        t=_api_tenant())
    assert result == NeedsRecording(api_url=API_URL, account_id="227799611", call_id=API_CAL)


@pytest.mark.parametrize(("url", "named"), [
    ("https://api.callrail.com/v3/a/227799611/calls/CALanother/recording.json",
     "recording URL names CallRail call 'CALanother' in account '227799611'"),
    (f"https://api.callrail.com/v3/a/999999/calls/{API_CAL}/recording.json",
     f"recording URL names CallRail call '{API_CAL}' in account '999999'"),
    ("https://api.callrail.com/v3/a/999999/calls/CALanother/recording.json",
     "recording URL names CallRail call 'CALanother' in account '999999'"),
])
def test_another_call_or_account_is_refused_before_any_lookup(url: str, named: str) -> None:
    raw = {**load("callrail", "api_call"), "recording": url}
    with pytest.raises(TransformError) as exc:
        action_for("callrail", [("api_call", raw)], t=_api_tenant(),
                   resolved={url: "https://app.callrail.com/calls/X/recording?access_key=k"})
    assert str(exc.value) == (f"{named}; only this call ({API_CAL}) in the tenant's own "
                              "account (227799611) is looked up")


def test_without_an_account_only_the_call_is_checked() -> None:
    other = {**load("callrail", "api_call"),
             "recording": "https://api.callrail.com/v3/a/1/calls/CALanother/recording.json"}
    with pytest.raises(TransformError, match=r"only this call \(.*\) in the tenant's own "
                                             r"account \(none\)"):
        action_for("callrail", [("api_call", other)])


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
