"""The webhook handler: one request in, one reply out. Verifies, stores durably, enqueues;
nothing here transforms a call or touches WSGI (``app.door`` reads the body and logs).

Checks run in SPEC order: size (413, the door, while reading), tenant and source section
(404), signature or token (401), body (400). A 202 is sent only after Redis has stored the raw
event and its queue message in one atomic script; when Redis can't, the answer is 503 with
Retry-After.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import redis

from rilla_bridge.lifecycle import Lifecycle, Status
from rilla_bridge.providers import callingly, callrail
from rilla_bridge.tenants import Tenant

log = logging.getLogger("rilla_bridge.web")
RETRY_AFTER_SECONDS = "5"
Headers = tuple[tuple[str, str], ...]
_RETRY: Headers = (("Retry-After", RETRY_AFTER_SECONDS),)


@dataclass(frozen=True)
class WebhookRequest:
    """What the handler needs of one webhook POST (the door builds it from the environ)."""

    source: str                      # "callrail" | "callingly", from the URL
    tenant: str                      # the tenant slug, from the URL
    body: bytes
    query: dict[str, list[str]] = field(default_factory=dict)
    signature: str | None = None     # CallRail's ``Signature`` header


@dataclass(frozen=True)
class Reply:
    """The answer, and what the request log line may say about it (never a secret)."""

    status: int
    body: bytes
    headers: Headers = ()
    tenant: str | None = None        # set once the tenant is known to exist
    kind: str | None = None
    event_id: str | None = None


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def parse_object(body: bytes) -> dict[str, Any] | str:
    """The body as a JSON object, or why it is not one."""
    if not body:
        return "empty body: expected a JSON object"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "body is not valid UTF-8"
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return "body is not valid JSON"
    if not isinstance(parsed, dict):
        return "body must be a JSON object"
    return parsed


class Intake:
    """Answers webhook requests for the tenants it was given, storing through ``lifecycle``."""

    def __init__(self, tenants: dict[str, Tenant], lifecycle: Lifecycle) -> None:
        self.tenants = tenants
        self.lifecycle = lifecycle

    def handle(self, req: WebhookRequest) -> Reply:
        tenant = self.tenants.get(req.tenant)
        if tenant is None:
            return Reply(404, error_body("unknown tenant"))
        slug = req.tenant
        if req.source == callrail.NAME:
            if tenant.callrail is None:
                return Reply(404, error_body("tenant has no CallRail configuration"), tenant=slug)
            if not callrail.signature_ok(tenant.callrail.signing_key, req.body, req.signature):
                return Reply(401, error_body("missing or invalid Signature"), tenant=slug)
            provider: Any = callrail
        else:
            if tenant.callingly is None:
                return Reply(404, error_body("tenant has no Callingly configuration"),
                             tenant=slug)
            if not callingly.token_ok(tenant.callingly.webhook_token,
                                      req.query.get("token", [None])[0]):
                return Reply(401, error_body("missing or invalid token"), tenant=slug)
            provider = callingly
        kinds: frozenset[str] = provider.KINDS
        event_param = req.query.get("event", [None])[0]
        if event_param is not None and event_param not in kinds:
            return Reply(400, error_body(f"unknown event {event_param[:40]!r}; expected one of "
                                         + ", ".join(sorted(kinds))), tenant=slug)
        parsed = parse_object(req.body)
        if isinstance(parsed, str):
            return Reply(400, error_body(parsed), tenant=slug)
        kind: str = event_param or provider.detect_kind(parsed)
        unkept = kind in provider.UNKEPT_KINDS
        try:
            stored = self.lifecycle.receive(
                source=req.source, tenant=slug, kind=kind, body=req.body,
                call_id=provider.call_id(kind, parsed),
                keep_body=not unkept, enqueue=not unkept,
                status=Status.SKIPPED if unkept else Status.QUEUED,
                note="Callingly lead event: acknowledged, body not kept" if unkept else "",
            )
        except redis.RedisError as exc:
            log.warning("redis could not take the event: %s", type(exc).__name__)
            return Reply(503, error_body("storage unavailable, retry later"), _RETRY,
                         tenant=slug, kind=kind)
        if stored.duplicate:
            status, code = "duplicate", 200
        else:
            status, code = ("skipped" if unkept else "queued"), 202
        return Reply(code, json.dumps({"id": stored.event_id, "status": status}).encode(),
                     tenant=slug, kind=kind, event_id=stored.event_id)
