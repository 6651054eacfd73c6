"""Webhook intake: verify, store durably, enqueue, answer. Nothing here transforms a call.

Checks run in SPEC order: size (413), tenant and source section (404), signature or token
(401), body (400). A 202 is sent only after Redis has stored the raw event and its queue
message in one atomic script; when Redis can't, the answer is 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from flask import Blueprint, Response, current_app, request

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
    config = current_app.config
    settings: Settings = config["RB_SETTINGS"]
    # What the request log line reports (see Observed); filled in as the checks pass.
    note: dict[str, Any] = request.environ.setdefault(NOTE, {})
    note["source"] = source
    body = _read_body(settings.max_body_bytes)
    if body is None:
        resp = error(413, f"body over {settings.max_body_bytes} bytes")
        resp.headers["Connection"] = "close"
        return resp
    tenants: dict[str, Tenant] = config["RB_TENANTS"]
    tenant = tenants.get(tenant_slug)
    if tenant is None:
        return error(404, "unknown tenant")
    note["tenant"] = tenant_slug
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
    note["kind"] = kind
    unkept = source == "callingly" and kind in CALLINGLY_UNKEPT
    store: EventStore = config["RB_STORE"]
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
    note["event_id"] = stored.event_id
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


NOTE = "rilla_bridge.note"
_metric_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}


class Observed:
    """WSGI middleware: one log line and the intake metrics per request, whatever answered
    it (view, error handler or router). Cheaper than Flask's before/after hooks and ``g``."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        started = time.perf_counter()
        seen: list[str] = []

        def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen.append(status)
            return start_response(status, headers, exc_info)

        result = self.wsgi_app(environ, _start_response)
        try:
            observe(environ, int(seen[-1][:3]) if seen else 500,
                    time.perf_counter() - started)
        except Exception:   # never let the log line or a metric fail a stored webhook
            log.exception("could not log or count a request")
        return result


def _path(environ: dict[str, Any]) -> str:
    """PATH_INFO as the client sent it (WSGI hands it over as latin-1 decoded bytes)."""
    raw: str = environ.get("PATH_INFO", "")
    return raw if raw.isascii() else raw.encode("latin-1", "replace").decode("utf-8", "replace")


def observe(environ: dict[str, Any], status: int, elapsed: float) -> None:
    """One log line per request and the intake metrics; never the query string or headers."""
    note: dict[str, Any] = environ.get(NOTE) or {}
    source = note.get("source")
    tenant = note.get("tenant")
    if source:
        key = (source, tenant or "unknown", str(status))
        children = _metric_children.get(key)
        if children is None:
            children = _metric_children[key] = (metrics.WEBHOOKS.labels(*key),
                                                 metrics.INTAKE_SECONDS.labels(source))
        children[0].inc()
        children[1].observe(elapsed)
    length = environ.get("CONTENT_LENGTH")
    log.info(
        "request", extra={
            "method": environ.get("REQUEST_METHOD"), "path": _path(environ),
            "status": status, "ms": round(elapsed * 1000, 2), "source": source,
            "tenant": tenant, "kind": note.get("kind"), "event_id": note.get("event_id"),
            "bytes": int(length) if length and length.isdigit() else None,
        })
