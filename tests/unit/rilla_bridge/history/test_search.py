"""The history's search columns (``rilla_bridge/history/search.py``) and the providers'
``search_fields``: phones in E.164, names, rep emails through the tenant's mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rilla_bridge.history.search import e164, searchable
from rilla_bridge.providers import search_fields
from tests.fakes import load, tenant


@pytest.mark.parametrize(("raw", "expected"), [
    ("+15125550100", "+15125550100"),
    ("(512) 555-0100", "+15125550100"),
    ("512.555.0100", "+15125550100"),
    ("1-512-555-0100", "+15125550100"),
    ("+1 512 555 0100", "+15125550100"),
    ("512-555-0100 ext. 12", "+15125550100"),
    ("+44 20 7946 0958", "+442079460958"),
    ("0044 20 7946 0958", "+442079460958"),
    ("442079460958", "+442079460958"),
    ("5550100", "5550100"),            # too short for E.164: digits, still searchable
    (5125550100, "+15125550100"),
    ("", None), ("n/a", None), (None, None), (True, None),
])
def test_e164(raw: Any, expected: str | None) -> None:
    assert e164(raw) == expected


@pytest.mark.parametrize(("source", "kind", "fixture", "expected"), [
    ("callrail", "post_call", "post_call", ("+17205550139", "Jordan Pike", "Mike@Acme.example")),
    ("callingly", "call_completed", "call_completed",
     ("+16025550148", "Marcus Bell", "dana@sunvalleyroofing.example")),
    # texts, forms and leads: parse skips them, the search columns are read best effort
    ("callrail", "text_received", "text_received", ("+17205550139", None, None)),
    ("callrail", "form_submission", "form_submission", ("+17205550139", "Jordan Pike", None)),
    ("callingly", "lead_created", "lead_created", ("+16025550148", "Marcus Bell", None)),
])
def test_search_fields_from_fixtures(source: str, kind: str, fixture: str,
                                     expected: tuple[str | None, ...]) -> None:
    assert search_fields(source, kind, load(source, fixture)) == expected


def test_search_fields_of_texts_take_the_customer_side() -> None:
    text = load("callrail", "text_received")
    assert search_fields("callrail", "text_sent", text)[0] == text["destination_number"]


def test_search_fields_never_raise() -> None:
    assert search_fields("callrail", "post_call", {"resource_id": ""}) == (None, None, None)
    assert search_fields("nowhere", "x", {"customer_name": "A B"}) == (None, "A B", None)
    not_a_dict: Any = []
    assert search_fields("callrail", "post_call", not_a_dict) == (None, None, None)


def test_searchable_maps_the_agent_to_the_rep_and_normalises() -> None:
    body = {**load("callrail", "post_call"), "agent_email": "Mike@Acme.example",
            "customer_phone_number": "(720) 555-0139"}
    raw = json.dumps(body).encode()
    assert searchable("callrail", "post_call", raw, tenant()) == (
        "+17205550139", "Jordan Pike", "mike.r@acme.example")
    # no agent: the tenant's default rep; no tenant: the agent as given
    no_agent = json.dumps({**body, "agent_email": ""}).encode()
    assert searchable("callrail", "post_call", no_agent, tenant())[2] == "office@acme.example"
    assert searchable("callrail", "post_call", raw, None)[2] == "mike@acme.example"


@pytest.mark.parametrize("body", [None, b"", b"not json", b"[1, 2]", b"\xff\xfe"])
def test_searchable_without_a_usable_body(body: bytes | None) -> None:
    assert searchable("callrail", "post_call", body, tenant()) == (None, None, None)


def test_searchable_reads_the_body_as_intake_does() -> None:
    """A body intake accepted keeps its search columns: a leading byte-order mark, or a
    number too long to be real (a missing field there, not a bad body)."""
    body = json.dumps({**load("callrail", "post_call"), "agent_email": "Mike@Acme.example"})
    expected = ("+17205550139", "Jordan Pike", "mike.r@acme.example")
    assert searchable("callrail", "post_call", b"\xef\xbb\xbf" + body.encode(),
                      tenant()) == expected
    huge = body[:-1] + ', "value": ' + "9" * 5000 + "}"
    assert searchable("callrail", "post_call", huge.encode(), tenant()) == expected
