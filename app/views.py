"""Webhook intake: verify, store durably, enqueue, answer. Nothing here transforms a call.

Checks run in SPEC order: size (413), tenant and source section (404), signature or token
(401), body (400). A 202 is sent only after Redis has stored the raw event and its queue
message in one atomic script; when Redis can't, the answer is 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from flask import Blueprint, Response, current_app, g, request

from app import metrics
from app.verify import (
    CALLINGLY_KINDS,
    CALLINGLY_UNKEPT,
    CALLRAIL_KINDS,
    callingly_kind,
    callrail_kind,
    callrail_signature_ok,
    provider_call_id,
    token_ok,
)
from rilla_bridge.events import EventStore
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

bp = Blueprint("intake", __name__)
log = logging.getLogger("rilla_bridge.web")
RETRY_AFTER_SECONDS = "5"


def error(status: int, message: str, **headers: str) -> Response:
    resp = Response(json.dumps({"error": message}), status=status, mimetype="application/json")
    for k, v in headers.items():
        resp.headers[k.replace("_", "-")] = v
    return resp


def _read_body(limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (never reading more than limit + 1 bytes)."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    while total <= limit:  # a stream read may return less than asked: read to EOF or limit
        chunk = request.stream.read(min(65536, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return None if total > limit else b"".join(chunks)


def _parse_object(body: bytes) -> dict[str, Any] | str:
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


def _intake(source: str, tenant_slug: str) -> Response:
    settings: Settings = current_app.config["RB_SETTINGS"]
    g.source = source
    body = _read_body(settings.max_body_bytes)
    if body is None:
        resp = error(413, f"body over {settings.max_body_bytes} bytes")
        resp.headers["Connection"] = "close"
        return resp
    tenants: dict[str, Tenant] = current_app.config["RB_TENANTS"]
    tenant = tenants.get(tenant_slug)
    if tenant is None:
        return error(404, "unknown tenant")
    g.tenant = tenant_slug
    if source == "callrail":
        if tenant.callrail is None:
            return error(404, "tenant has no CallRail configuration")
        if not callrail_signature_ok(tenant.callrail.signing_key, body,
                                     request.headers.get("Signature")):
            return error(401, "missing or invalid Signature")
        kinds = CALLRAIL_KINDS
    else:
        if tenant.callingly is None:
            return error(404, "tenant has no Callingly configuration")
        if not token_ok(tenant.callingly.webhook_token, request.args.get("token")):
            return error(401, "missing or invalid token")
        kinds = CALLINGLY_KINDS
    event_param = request.args.get("event")
    if event_param is not None and event_param not in kinds:
        return error(400, f"unknown event {event_param[:40]!r}; expected one of "
                     + ", ".join(sorted(kinds)))
    parsed = _parse_object(body)
    if isinstance(parsed, str):
        return error(400, parsed)
    if event_param:
        kind = event_param
    else:
        kind = callrail_kind(parsed) if source == "callrail" else callingly_kind(parsed)
    g.kind = kind
    unkept = source == "callingly" and kind in CALLINGLY_UNKEPT
    store: EventStore = current_app.config["RB_STORE"]
    try:
        stored = store.intake(
            source=source, tenant=tenant_slug, kind=kind, body=body,
            call_id=provider_call_id(source, kind, parsed),
            keep_body=not unkept, enqueue=not unkept,
            status="skipped" if unkept else "queued",
            note="Callingly lead event: acknowledged, body not kept" if unkept else "",
        )
    except redis.RedisError as exc:
        log.warning("redis could not take the event: %s", type(exc).__name__)
        return error(503, "storage unavailable, retry later", Retry_After=RETRY_AFTER_SECONDS)
    g.event_id = stored.event_id
    if stored.duplicate:
        status, code = "duplicate", 200
    else:
        status, code = ("skipped" if unkept else "queued"), 202
    return Response(json.dumps({"id": stored.event_id, "status": status}), status=code,
                    mimetype="application/json")


@bp.post("/webhooks/callrail/<tenant>")
def callrail_webhook(tenant: str) -> Response:
    """CallRail: ``Signature`` header over the raw body; kind from ``?event=`` or shape."""
    return _intake("callrail", tenant)


@bp.post("/webhooks/callingly/<tenant>")
def callingly_webhook(tenant: str) -> Response:
    """Callingly: unsigned, so ``?token=`` is compared in constant time."""
    return _intake("callingly", tenant)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status": "ok"}', mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    client: redis.Redis = current_app.config["RB_REDIS"]
    try:
        client.ping()
    except redis.RedisError:
        return error(503, "redis unreachable", Retry_After=RETRY_AFTER_SECONDS)
    return Response('{"status": "ready"}', mimetype="application/json")


@bp.get("/metrics")
def metrics_view() -> Response:
    data, content_type = metrics.render(current_app.config["RB_REDIS"])
    return Response(data, content_type=content_type)


def observe(response: Response, started: float) -> None:
    """One log line per request and the intake metrics; never the query string or headers."""
    elapsed = time.perf_counter() - started
    source = g.get("source")
    if source:
        tenant = g.get("tenant") or "unknown"
        metrics.WEBHOOKS.labels(source, tenant, str(response.status_code)).inc()
        metrics.INTAKE_SECONDS.labels(source).observe(elapsed)
    log.info(
        "request", extra={
            "method": request.method, "path": request.path, "status": response.status_code,
            "ms": round(elapsed * 1000, 2), "source": source, "tenant": g.get("tenant"),
            "kind": g.get("kind"), "event_id": g.get("event_id"),
            "bytes": request.content_length,
        })
