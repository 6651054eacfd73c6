"""Everything about Callingly's webhooks: the token check, the event kinds and their ranks, how a
kind is told from a body, the call id and the ``call_completed`` schema.

Callingly does not sign its webhooks; the URL carries ``?token=``, compared in constant time.
Lead events (``lead_created``, ``lead_updated``) carry account secrets (2FA secrets, API keys):
their bodies are never stored.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, post_load

from rilla_bridge.transform import fields as f
from rilla_bridge.transform.model import Skip, Snapshot, TransformError

NAME = "callingly"
LABEL = "Callingly"

KINDS = frozenset({"call_completed", "lead_created", "lead_updated"})
UNKEPT_KINDS = frozenset({"lead_created", "lead_updated"})


def token_ok(expected: Sequence[str], given: str | None) -> bool:
    """Whether ``?token=`` equals one of the tenant's webhook tokens (two while one is
    rotated); every token is compared, in constant time."""
    if not given:
        return False
    raw = given.encode("utf-8", "replace")
    ok = False
    for token in expected:
        ok |= hmac.compare_digest(token.encode(), raw)
    return ok


def detect_kind(body: dict[str, Any]) -> str:
    """Lead updates name the field; a call has a lead object, seconds or a recording."""
    if "updatedField" in body or "updatedValue" in body:
        return "lead_updated"
    if isinstance(body.get("lead"), dict) or "seconds" in body or "recording_url" in body:
        return "call_completed"
    if "fname" in body or "lname" in body:
        return "lead_created"
    return "call_completed"


# Keys that only lead bodies carry (account and user records); their presence anywhere in a
# body means it is a lead event, whatever the unsigned ``?event=`` parameter claims.
_LEAD_ONLY_KEYS = frozenset({"two_factor_secret", "two_factor_recovery_codes", "openai_key",
                             "stripe_id", "webhook_slug", "updatedField", "updatedValue"})


def _has_lead_keys(value: Any, depth: int = 0) -> bool:
    if depth > 6:
        return False
    if isinstance(value, dict):
        return any(k in _LEAD_ONLY_KEYS or _has_lead_keys(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lead_keys(v, depth + 1) for v in value[:50])
    return False


def kind_of(claimed: str | None, body: dict[str, Any]) -> str:
    """The event kind: ``?event=`` when given, else the body's shape; but a body shaped like a
    lead event (or carrying a lead's account secrets) is one, whatever ``?event=`` says, so
    its secrets are never stored."""
    shape = detect_kind(body)
    if shape in UNKEPT_KINDS:
        return shape
    if _has_lead_keys(body):
        return "lead_updated"
    return claimed or shape


def call_id(kind: str, body: dict[str, Any]) -> str | None:
    """Callingly's id of the call, for ``call_completed`` only (leads are not calls)."""
    return f.raw_call_id(body.get("id")) if kind == "call_completed" else None


# -- the call_completed schema --------------------------------------------------------------
# What goes into the appointment's custom_fields, from the merged call fields (SPEC mapping).
CUSTOM_FIELDS = ("team", "direction", "status", "result", "tags")
RANKS: dict[str, int] = {"call_completed": 2}
SKIP_KINDS: dict[str, str] = {
    "lead_created": "Callingly lead_created: a lead event, not a call",
    "lead_updated": "Callingly lead_updated: a lead event, not a call",
}


class LeadSchema(Schema):
    """The call's lead; ``fname``/``lname`` are the API and lead-event spellings."""

    class Meta:
        unknown = EXCLUDE

    id = f.LooseId()
    first_name = f.Text()
    last_name = f.Text()
    fname = f.Text()
    lname = f.Text()
    email = f.Text()
    phone_number = f.Text()
    source = f.Text()
    tags = f.Tags()


class UserSchema(Schema):
    """The agent on the call (``null`` on missed calls)."""

    class Meta:
        unknown = EXCLUDE

    email = f.Text()


class CallCompletedSchema(Schema):
    """A Callingly call record as posted by the ``call_completed`` webhook."""

    class Meta:
        unknown = EXCLUDE

    id = f.LooseId()
    team_name = f.Text()
    status = f.Text()
    result = f.Text()
    direction = f.Text()
    tag = f.Tags()
    lead = f.Object(LeadSchema())
    user = f.Object(UserSchema())
    recording_url = f.Text()
    seconds = f.Seconds()
    call_seconds = f.Seconds()
    datetime = f.Text()

    @post_load
    def normalize(self, d: dict[str, Any], **_: Any) -> dict[str, Any]:
        if d["id"] is None:
            raise ValidationError("no usable call id")
        lead: dict[str, Any] = d["lead"] or {}
        seconds = d["seconds"] if d["seconds"] is not None else d["call_seconds"]
        user: dict[str, Any] = d["user"] or {}
        first = lead.get("first_name") or lead.get("fname")
        last = lead.get("last_name") or lead.get("lname")
        name = " ".join(part for part in (first, last) if part) or None
        raw_start: str | None = d["datetime"]
        start = f.to_utc(raw_start) if raw_start else None
        lead_tags: list[str] = lead.get("tags") or []
        tags = lead_tags + [t for t in d["tag"] or [] if t not in lead_tags]
        fields: dict[str, Any] = {
            "start_time": start,
            "start_time_invalid": raw_start if raw_start and start is None else None,
            "duration": f.seconds_field(seconds)[0],
            "duration_invalid": f.seconds_field(seconds)[1],
            "recording": d["recording_url"],
            "agent_email": user.get("email"),
            "customer_id": lead.get("id"),
            "customer_name": name,
            "customer_phone": lead.get("phone_number"),
            "customer_email": lead.get("email"),
            "lead_source": lead.get("source"),
            "team": d["team_name"],
            "direction": d["direction"].lower() if d["direction"] else None,
            "status": d["status"],
            "result": d["result"],
            "tags": tags or None,
        }
        return {"call_id": d["id"], "fields": fields}


_SCHEMA = CallCompletedSchema()


def parse(kind: str, raw: dict[str, Any]) -> Snapshot | Skip:
    """One Callingly webhook body as a Snapshot (``call_completed``) or Skip (lead events)."""
    if kind in SKIP_KINDS:
        return Skip(SKIP_KINDS[kind])
    if kind not in RANKS:
        raise TransformError(f"unknown Callingly event kind {kind!r}")
    try:
        loaded = _SCHEMA.load(raw)
    except ValidationError as exc:
        reason = f.validation_text(exc)
        if reason == "no usable call id":
            reason = f"no usable call id: id {f.preview(raw.get('id'))} is missing or not an id"
        raise TransformError(f"malformed Callingly {kind} body: {reason}") from None
    return Snapshot(call_id=loaded["call_id"], rank=RANKS[kind], fields=loaded["fields"])
