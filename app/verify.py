"""Webhook authentication and event-kind detection: pure functions over bytes and dicts."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

CALLRAIL_KINDS = frozenset({
    "pre_call", "call_routing_complete", "post_call", "call_modified", "outbound_post_call",
    "outbound_call_modified", "text_received", "text_sent", "form_submission",
})
CALLINGLY_KINDS = frozenset({"call_completed", "lead_created", "lead_updated"})
# Callingly lead bodies carry account secrets (2FA secrets, API keys): never stored.
CALLINGLY_UNKEPT = frozenset({"lead_created", "lead_updated"})


def callrail_signature(signing_key: str, body: bytes) -> str:
    """base64(HMAC-SHA1(key as UTF-8, raw body)), as CallRail sends in ``Signature``."""
    digest = hmac.new(signing_key.encode("utf-8"), body, hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def callrail_signature_ok(signing_key: str, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    expected = callrail_signature(signing_key, body)
    return hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace"))


def token_ok(expected: str, given: str | None) -> bool:
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def callrail_kind(body: dict[str, Any]) -> str:
    """SPEC: ``changes`` = modified, ``content`` = text, ``form_data`` = form, else post-call."""
    if "changes" in body:
        return "call_modified"
    if "content" in body:
        return "text_sent" if "agent" in body else "text_received"
    if "form_data" in body:
        return "form_submission"
    return "post_call"


def callingly_kind(body: dict[str, Any]) -> str:
    if "updatedField" in body or "updatedValue" in body:
        return "lead_updated"
    if isinstance(body.get("lead"), dict) or "seconds" in body or "recording_url" in body:
        return "call_completed"
    if "fname" in body or "lname" in body:
        return "lead_created"
    return "call_completed"


def provider_call_id(source: str, kind: str, body: dict[str, Any]) -> str | None:
    """The provider's id of the call this event is about, when it has one."""
    if source == "callingly":
        if kind != "call_completed":
            return None
        value = body.get("id")
    else:
        value = body.get("resource_id") or body.get("id")
    if isinstance(value, bool) or value in (None, ""):
        return None
    if isinstance(value, int | str):
        # JSON may escape lone surrogates ("\ud800"): valid JSON, but not UTF-8 for Redis.
        return str(value)[:100].encode("utf-8", "replace").decode("utf-8")
    return None
