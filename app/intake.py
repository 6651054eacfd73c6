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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.jsonbody import parse_object
from rilla_bridge.lifecycle import IntakeLimit, Lifecycle
from rilla_bridge.providers import callingly, callrail
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

log = logging.getLogger("rilla_bridge.web")
RETRY_AFTER_SECONDS = "5"
AUTH_WINDOW_SECONDS = 60
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
    client: str = ""                 # the client's address (see ``door.client_address``)


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


class Intake:
    """Answers webhook requests for the tenants it was given, storing through ``lifecycle``."""

    def __init__(self, tenants: Mapping[str, Tenant], lifecycle: Lifecycle,
                 settings: Settings) -> None:
        self.tenants = tenants
        self.lifecycle = lifecycle
        self.settings = settings

    def _limit(self, tenant: Tenant) -> IntakeLimit:
        per_s = tenant.intake_per_second or self.settings.tenant_intake_per_second
        mib = tenant.intake_mib_per_minute or self.settings.tenant_intake_mib_per_minute
        return per_s, mib * 1024 * 1024 / 60

    @staticmethod
    def _limited(slug: str, wait: int) -> Reply:
        return Reply(429, error_body("tenant over its intake limit; retry later"),
                     (("Retry-After", str(wait)),), tenant=slug)

    def _unauthorized(self, req: WebhookRequest, message: str) -> Reply:
        """401, counted against the client's address; past ``AUTH_FAILURES_PER_MINUTE`` in
        the address's minute, 429 with the seconds left of it (guessing a secret is slowed;
        a valid webhook from the same address never comes here, so it is never held)."""
        limit = self.settings.auth_failures_per_minute
        if limit and req.client:
            key = keys.auth_failures(req.client)
            try:
                with self.lifecycle.redis.pipeline(transaction=True) as pipe:
                    # The window starts with the first failure (SET NX, not EXPIRE NX, which
                    # needs Redis 7: on 6.2 the MULTI would fail and nothing be counted).
                    pipe.set(key, 0, ex=AUTH_WINDOW_SECONDS, nx=True)
                    pipe.incr(key)
                    pipe.ttl(key)
                    _, failures, ttl = pipe.execute()
            except redis.RedisError:
                failures = 0   # a full or absent Redis: the plain 401, never an error
            if int(failures) > limit:
                return Reply(429, error_body("too many failed signatures or tokens from this "
                                             "address; retry later"),
                             (("Retry-After", str(max(1, int(ttl)))),), tenant=req.tenant)
        return Reply(401, error_body(message), tenant=req.tenant)

    def handle(self, req: WebhookRequest) -> Reply:
        tenant = self.tenants.get(req.tenant)
        if tenant is None:
            return Reply(404, error_body("unknown tenant"))
        slug = req.tenant
        if req.source == callrail.NAME:
            if tenant.callrail is None:
                return Reply(404, error_body("tenant has no CallRail configuration"), tenant=slug)
            if not callrail.signature_ok(tenant.callrail.signing_keys, req.body, req.signature):
                return self._unauthorized(req, "missing or invalid Signature")
            provider: Any = callrail
        else:
            if tenant.callingly is None:
                return Reply(404, error_body("tenant has no Callingly configuration"),
                             tenant=slug)
            if not callingly.token_ok(tenant.callingly.webhook_tokens,
                                      req.query.get("token", [None])[0]):
                return self._unauthorized(req, "missing or invalid token")
            provider = callingly
        limit = self._limit(tenant)
        kinds: frozenset[str] = provider.KINDS
        event_param = req.query.get("event", [None])[0]
        parsed: dict[str, Any] | str
        if event_param is not None and event_param not in kinds:
            parsed = (f"unknown event {event_param[:40]!r}; expected one of "
                      + ", ".join(sorted(kinds)))
        else:
            parsed = parse_object(req.body)
        try:
            if isinstance(parsed, str):
                # SPEC's order: the intake limit (429) before the body (400); a bad body counts.
                wait = self.lifecycle.take_intake(slug, len(req.body), limit)
                if wait:
                    return self._limited(slug, wait)
                return Reply(400, error_body(parsed), tenant=slug)
            kind: str = provider.kind_of(event_param, parsed)
            unkept = kind in provider.UNKEPT_KINDS
            stored = self.lifecycle.receive(
                source=req.source, tenant=slug, kind=kind, body=req.body,
                call_id=provider.call_id(kind, parsed), keep=not unkept, limit=limit,
                note="Callingly lead event: acknowledged, body not kept" if unkept else "",
            )
        except redis.RedisError as exc:
            log.warning("redis could not take the event: %s", type(exc).__name__)
            return Reply(503, error_body("storage unavailable, retry later"), _RETRY,
                         tenant=slug)
        if stored.retry_after:
            return self._limited(slug, stored.retry_after)
        if stored.duplicate:
            status, code = "duplicate", 200
        else:
            status, code = ("skipped" if unkept else "queued"), 202
        return Reply(code, json.dumps({"id": stored.event_id, "status": status}).encode(),
                     tenant=slug, kind=kind, event_id=stored.event_id)
