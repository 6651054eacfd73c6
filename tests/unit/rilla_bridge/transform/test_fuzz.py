"""parse_event + merge + build_action on arbitrary JSON-ish input: only TransformError escapes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rilla_bridge.providers import parse_event
from rilla_bridge.transform.build import build_action
from rilla_bridge.transform.merge import merge_snapshots
from rilla_bridge.transform.model import (
    Delete,
    NeedsRecording,
    Skip,
    Snapshot,
    TransformError,
    Upsert,
)
from tests.fakes import load, tenant

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from([10**12, 2**63, -1, 0, 1.5, "1e400", "99999999999999999999"]),
    st.sampled_from(["", "true", "false", "0", "1", "247", "2025-13-45",
                     "2025-03-11T09:42:17.811-05:00", "9999-12-31T23:59:59-14:00",
                     "0001-01-01T00:00:00+14:00", "2018-02-19 18:41:00",
                     "https://api.callrail.com/v3/a/1/calls/CAL1/recording.json",
                     "https://app.callrail.com/calls/CAL1/recording/redirect?access_key=k",
                     "not a url", "x@y.example", "CAL4f1c9e27b3a84d6f9e0d2c5a7b18e3f6"]),
)
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
_KEYS = ["resource_id", "id", "start_time", "datetime", "duration", "recording", "spam",
         "answered", "direction", "customer_name", "customer_phone_number", "customer_city",
         "customer_state", "person_resource_id", "person_id", "agent_email", "tags", "value",
         "campaign", "source_name", "source", "answers", "form_data", "content",
         "source_number", "lead", "user", "recording_url", "seconds", "tag", "team_name",
         "status", "result"]
_bodies = st.dictionaries(st.sampled_from(_KEYS), _json, max_size=12)
_kinds = st.sampled_from([
    ("callrail", "pre_call"), ("callrail", "call_routing_complete"), ("callrail", "post_call"),
    ("callrail", "call_modified"), ("callrail", "outbound_post_call"),
    ("callrail", "outbound_call_modified"), ("callrail", "api_call"),
    ("callrail", "text_received"), ("callrail", "form_submission"), ("callrail", "bogus"),
    ("callingly", "call_completed"), ("callingly", "lead_updated"), ("callingly", "bogus"),
    ("other", "post_call"),
])
_RESULTS = (Upsert, Delete, Skip, NeedsRecording)


def _run(source: str, kind: str, raw: dict[str, Any], deliver_unrecorded: bool) -> None:
    try:
        result = parse_event(source, kind, raw)
    except TransformError as exc:
        assert str(exc)
        return
    if isinstance(result, Skip):
        return
    assert isinstance(result, Snapshot)
    # Fields must survive the Redis JSON round trip unchanged.
    stored = json.loads(json.dumps(result.fields, allow_nan=False))
    assert stored == result.fields
    merged = merge_snapshots([{"rank": result.rank, "received_at": 1.0, "fields": stored}])
    try:
        action = build_action(source, result.call_id, merged,
                              tenant(deliver_unrecorded=deliver_unrecorded), {})
    except TransformError as exc:
        assert str(exc)
        return
    assert isinstance(action, _RESULTS)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(kind=_kinds, raw=_bodies, deliver_unrecorded=st.booleans())
def test_arbitrary_bodies_only_raise_transform_error(
        kind: tuple[str, str], raw: dict[str, Any], deliver_unrecorded: bool) -> None:
    _run(kind[0], kind[1], raw, deliver_unrecorded)


_FIXTURES = [("callrail", "post_call", "post_call"), ("callrail", "api_call", "api_call"),
             ("callrail", "outbound_post_call", "outbound_post_call"),
             ("callingly", "call_completed", "call_completed")]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(_FIXTURES), changes=_bodies, deliver_unrecorded=st.booleans())
def test_mutated_real_bodies_only_raise_transform_error(
        which: tuple[str, str, str], changes: dict[str, Any], deliver_unrecorded: bool) -> None:
    source, kind, fixture = which
    raw = load(source, fixture)
    raw.update(changes)
    _run(source, kind, raw, deliver_unrecorded)
