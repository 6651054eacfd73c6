"""Everything about CallRail's webhooks: the signature, the event kinds and their ranks, how a
kind is told from a body, the call id, the call schema and the API recording-URL pattern.

The web process imports the webhook part (``signature_ok``, ``KINDS``, ``detect_kind``,
``call_id``); the transform layer imports ``parse``. The API client lives in
``rilla_bridge.clients.callrail`` and takes its URL pattern from here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from marshmallow import EXCLUDE, Schema, ValidationError, post_load

from rilla_bridge.transform import fields as f
from rilla_bridge.transform.model import Skip, Snapshot, TransformError

NAME = "callrail"
LABEL = "CallRail"

# The ``?event=`` values a webhook URL may carry (SPEC "Webhook intake").
KINDS = frozenset({
    "pre_call", "call_routing_complete", "post_call", "call_modified", "outbound_post_call",
    "outbound_call_modified", "text_received", "text_sent", "form_submission",
})
# Kinds whose bodies are never stored (none for CallRail).
UNKEPT_KINDS: frozenset[str] = frozenset()


def signature(signing_key: str, body: bytes) -> str:
    """base64(HMAC-SHA1(key as UTF-8, raw body)), as CallRail sends in ``Signature``."""
    digest = hmac.new(signing_key.encode("utf-8"), body, hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_ok(signing_keys: Sequence[str], body: bytes, header: str | None) -> bool:
    """Whether the ``Signature`` header signs ``body`` with one of ``signing_keys`` (two while
    a key is rotated); every key is compared, in constant time."""
    if not header:
        return False
    given = header.strip().encode("utf-8", "replace")
    ok = False
    for key in signing_keys:
        ok |= hmac.compare_digest(signature(key, body).encode(), given)
    return ok


def detect_kind(body: dict[str, Any]) -> str:
    """SPEC: ``changes`` = modified, ``content`` = text, ``form_data`` = form, else post-call."""
    if "changes" in body:
        return "call_modified"
    if "content" in body:
        return "text_sent" if "agent" in body else "text_received"
    if "form_data" in body:
        return "form_submission"
    return "post_call"


def kind_of(claimed: str | None, body: dict[str, Any]) -> str:
    """The event kind: ``?event=`` when given (CallRail's per-event URLs), else the shape."""
    return claimed or detect_kind(body)


def call_id(kind: str, body: dict[str, Any]) -> str | None:
    """CallRail's id of the call this event is about, when it has one."""
    return f.raw_call_id(body.get("resource_id") or body.get("id"))


_RECORDING_API_PATH = re.compile(r"^/v3/a/([^/]+)/calls/([^/]+)/recording\.json$")


def recording_api_call(url: Any) -> tuple[str, str] | None:
    """``(account_id, call_id)`` when ``url`` is an API recording URL
    (``.../v3/a/{acct}/calls/{id}/recording.json``, any host: the API client only ever sends
    its key to its own base URL), else None."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https"):
        return None
    m = _RECORDING_API_PATH.match(parts.path)
    return (m.group(1), m.group(2)) if m else None


# -- the call schema ------------------------------------------------------------------------
# What goes into the appointment's custom_fields, from the merged call fields (SPEC mapping).
CUSTOM_FIELDS = ("direction", "duration", "tracking_number", "tags", "campaign", "value",
                 "answered")
RANKS: dict[str, int] = {
    "pre_call": 0,
    "call_routing_complete": 1,
    "post_call": 2,
    "outbound_post_call": 2,
    "api_call": 2,
    "call_modified": 3,
    "outbound_call_modified": 3,
}
SKIP_KINDS: dict[str, str] = {
    "text_received": "text message received: texts carry no call recording",
    "text_sent": "text message sent: texts carry no call recording",
    "form_submission": "form submission: forms carry no call recording",
}
# Pre-call and routing-complete bodies hold placeholders for these (answered=false, duration 0,
# call_type missed) that are not outcomes; keeping them would only add wrong values to merges.
_OUTCOME_FIELDS = ("answered", "duration", "duration_invalid", "spam", "recording",
                   "voicemail")
# Caller-ID names that are not a person.
_NOT_A_NAME = frozenset({
    "wireless caller", "unknown", "unknown caller", "unavailable", "private", "private caller",
    "anonymous", "restricted", "toll free call", "toll free", "out of area", "no caller id",
})
_SQUASH_RE = re.compile(r"[^a-z0-9]+")


def _squash(text: str | None) -> str:
    return _SQUASH_RE.sub("", (text or "").lower())


def person_name(name: str | None, city: str | None, state: str | None,
                location: str | None, phone: str | None) -> str | None:
    """The caller-ID name when it names a person; None when it is a place or a placeholder.

    Caller-ID names are often the caller's town (``"Laguna Beach Ca"``, ``"BLUE RIDGE, GA"``),
    which would make a misleading customer name and title.
    """
    if not name:
        return None
    key = _squash(name)
    if not key or name.strip().lower() in _NOT_A_NAME:
        return None
    places = {_squash(city), _squash(f"{city or ''}{state or ''}"), _squash(location)}
    places.discard("")
    if key in places or (phone and key == _squash(phone)):
        return None
    return name


class CallSchema(Schema):
    """A CallRail call object; modern and legacy names both load, the modern one wins."""

    class Meta:
        unknown = EXCLUDE

    resource_id = f.LooseId()
    id = f.LooseId()
    start_time = f.Text()
    datetime = f.Text()
    duration = f.Seconds()
    recording = f.Text()
    spam = f.Bool()
    answered = f.Bool()
    voicemail = f.Bool()
    direction = f.Text()
    customer_name = f.Text()
    callername = f.Text()
    customer_phone_number = f.Text()
    customer_number = f.Text()  # the pre-call name on CallRail's support page
    callernum = f.Text()
    customer_city = f.Text()
    callercity = f.Text()
    customer_state = f.Text()
    callerstate = f.Text()
    formatted_customer_location = f.Text()
    person_resource_id = f.LooseId()
    person_id = f.LooseId()  # the API's name; a PER... id there, a numeric one in old webhooks
    agent_email = f.Text()
    tracking_phone_number = f.Text()
    trackingnum = f.Text()
    tags = f.Tags()
    campaign = f.Text()
    utm_campaign = f.Text()
    value = f.Scalar()
    source_name = f.Text()
    source = f.Text()

    @post_load
    def normalize(self, d: dict[str, Any], **_: Any) -> dict[str, Any]:
        call_id = d["resource_id"] or d["id"]
        if call_id is None:
            raise ValidationError("no usable call id")
        start, invalid = _start(d["start_time"], d["datetime"])
        phone = d["customer_phone_number"] or d["customer_number"] or d["callernum"]
        city = d["customer_city"] or d["callercity"]
        state = d["customer_state"] or d["callerstate"]
        name = person_name(d["customer_name"] or d["callername"], city, state,
                           d["formatted_customer_location"], phone)
        fields: dict[str, Any] = {
            "start_time": start,
            "start_time_invalid": invalid,
            "duration": f.seconds_field(d["duration"])[0],
            "duration_invalid": f.seconds_field(d["duration"])[1],
            "recording": d["recording"],
            "spam": d["spam"],
            "answered": d["answered"],
            "voicemail": d["voicemail"],
            "direction": d["direction"].lower() if d["direction"] else None,
            "customer_id": d["person_resource_id"] or _person_resource(d["person_id"]),
            "customer_name": name,
            "customer_phone": phone,
            "customer_city": city,
            "customer_state": state,
            "agent_email": d["agent_email"],
            "tracking_number": d["tracking_phone_number"] or d["trackingnum"],
            "tags": d["tags"],
            "campaign": d["campaign"] or d["utm_campaign"],
            "value": d["value"],
            "source_name": d["source_name"],
            "source": d["source"],
        }
        return {"call_id": call_id, "fields": fields}


def _person_resource(person_id: str | None) -> str | None:
    # Only the PER... form is the same id that webhooks send as person_resource_id.
    return person_id if person_id and person_id.startswith("PER") else None


def _start(start_time: str | None, legacy: str | None) -> tuple[str | None, str | None]:
    """(UTC start, bad raw value). Legacy ``datetime`` is UTC without offset: a fallback only."""
    utc = f.to_utc(start_time) if start_time else None
    if utc is None and legacy:
        utc = f.naive_utc(legacy) or f.to_utc(legacy)
    if utc is None and start_time:
        # Kept so the dead letter can say which value was unusable; a later event may fix it.
        return None, start_time
    return utc, None


_SCHEMA = CallSchema()


def parse(kind: str, raw: dict[str, Any]) -> Snapshot | Skip:
    """One CallRail webhook (or API call object for ``api_call``) as a Snapshot or Skip."""
    if "answers" in raw:
        return Skip(f"Convert Assist body ({kind}): AI answers about a lead, not a call")
    if kind in SKIP_KINDS:
        return Skip(SKIP_KINDS[kind])
    if kind not in RANKS:
        raise TransformError(f"unknown CallRail event kind {kind!r}")
    # The kind comes from our URL; the body's shape is CallRail's own word, so trust it too.
    if "form_data" in raw:
        return Skip(f"form submission: a form body arrived as {kind}")
    if "content" in raw and "source_number" in raw:
        return Skip(f"text message: a text body arrived as {kind}")
    try:
        loaded = _SCHEMA.load(raw)
    except ValidationError as exc:
        reason = f.validation_text(exc)
        if reason == "no usable call id":
            reason = (f"no usable call id: resource_id {f.preview(raw.get('resource_id'))} "
                      f"and legacy id {f.preview(raw.get('id'))} are missing or not ids")
        raise TransformError(f"malformed CallRail {kind} body: {reason}") from None
    fields: dict[str, Any] = loaded["fields"]
    rank = RANKS[kind]
    if rank < 2:
        for key in _OUTCOME_FIELDS:
            fields[key] = None
    return Snapshot(call_id=loaded["call_id"], rank=rank, fields=fields)

