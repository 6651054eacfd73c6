"""Webhook intake: verify, store durably, enqueue, answer. Nothing here transforms a call.

Checks run in SPEC order: size (413), tenant and source section (404), signature or token
(401), body (400). A 202 is sent only after Redis has stored the raw event and its queue
message in one atomic script; when Redis can't, the answer is 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import redis
from flask import Blueprint, Response, current_app, request
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_input_stream

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
    """The JSON error reply of the Flask routes and handlers: the same as the front door's."""
    return _as_response(_reply(status, message,
                               tuple((k.replace("_", "-"), v) for k, v in headers.items())))


class ShortBody(Exception):
    """The client sent fewer bytes than its Content-Length."""


def _read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (never reading more than limit + 1 bytes).
    werkzeug's input stream: bounded by Content-Length, or read to EOF when the server says
    the input is terminated (gunicorn, for chunked bodies), else empty."""
    length = environ.get("CONTENT_LENGTH")
    if length and length.isascii() and length.isdigit():
        declared = int(length)
        if declared > limit:
            return None
        # The server bounds wsgi.input by Content-Length (PEP 3333): one read, as werkzeug's
        # LimitedStream would do. A client that sent less and hung up gets a 400 (as with
        # werkzeug), not a 401 for a signature over half a body.
        body: bytes = environ["wsgi.input"].read(declared)
        if len(body) < declared:
            raise ShortBody
        return body
    stream = get_input_stream(environ, max_content_length=None)
    chunks: list[bytes] = []
    total = 0
    while total <= limit:  # a stream read may return less than asked: read to EOF or limit
        chunk = stream.read(min(65536, limit + 1 - total))
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


Reply = tuple[int, bytes, tuple[tuple[str, str], ...]]
_CLOSE = (("Connection", "close"),)
_RETRY = (("Retry-After", RETRY_AFTER_SECONDS),)


def _reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return status, json.dumps({"error": message}).encode(), headers


def _query(environ: dict[str, Any]) -> dict[str, list[str]]:
    qs = environ.get("QUERY_STRING")
    return parse_qs(qs, keep_blank_values=True) if qs else {}


class Intake:
    """The webhook handler, on a bare WSGI environ: no Flask request context per webhook (the
    front door below calls it directly; the Flask routes only exist for 405 and url_for)."""

    def __init__(self, settings: Settings, tenants: dict[str, Tenant], store: EventStore
                 ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.store = store

    def handle(self, environ: dict[str, Any], source: str, tenant_slug: str) -> Reply:
        # What the request log line reports (see FrontDoor); filled in as the checks pass.
        note: dict[str, Any] = environ.setdefault(NOTE, {})
        note["source"] = source
        limit = self.settings.max_body_bytes
        try:
            body = _read_body(environ, limit)
        except ShortBody:
            return _reply(400, "body shorter than its Content-Length")
        if body is None:
            return _reply(413, f"body over {limit} bytes", _CLOSE)
        tenant = self.tenants.get(tenant_slug)
        if tenant is None:
            return _reply(404, "unknown tenant")
        note["tenant"] = tenant_slug
        query = _query(environ)
        if source == "callrail":
            if tenant.callrail is None:
                return _reply(404, "tenant has no CallRail configuration")
            if not callrail_signature_ok(tenant.callrail.signing_key, body,
                                         environ.get("HTTP_SIGNATURE")):
                return _reply(401, "missing or invalid Signature")
            kinds = CALLRAIL_KINDS
        else:
            if tenant.callingly is None:
                return _reply(404, "tenant has no Callingly configuration")
            if not token_ok(tenant.callingly.webhook_token, query.get("token", [None])[0]):
                return _reply(401, "missing or invalid token")
            kinds = CALLINGLY_KINDS
        event_param = query.get("event", [None])[0]
        if event_param is not None and event_param not in kinds:
            return _reply(400, f"unknown event {event_param[:40]!r}; expected one of "
                          + ", ".join(sorted(kinds)))
        parsed = _parse_object(body)
        if isinstance(parsed, str):
            return _reply(400, parsed)
        if event_param:
            kind = event_param
        else:
            kind = callrail_kind(parsed) if source == "callrail" else callingly_kind(parsed)
        note["kind"] = kind
        unkept = source == "callingly" and kind in CALLINGLY_UNKEPT
        try:
            stored = self.store.intake(
                source=source, tenant=tenant_slug, kind=kind, body=body,
                call_id=provider_call_id(source, kind, parsed),
                keep_body=not unkept, enqueue=not unkept,
                status="skipped" if unkept else "queued",
                note="Callingly lead event: acknowledged, body not kept" if unkept else "",
            )
        except redis.RedisError as exc:
            log.warning("redis could not take the event: %s", type(exc).__name__)
            return _reply(503, "storage unavailable, retry later", _RETRY)
        note["event_id"] = stored.event_id
        if stored.duplicate:
            status, code = "duplicate", 200
        else:
            status, code = ("skipped" if unkept else "queued"), 202
        return code, json.dumps({"id": stored.event_id, "status": status}).encode(), ()


def _as_response(reply: Reply) -> Response:
    status, body, headers = reply
    resp = Response(body, status=status, mimetype="application/json")
    for k, v in headers:
        resp.headers[k] = v
    return resp


@bp.post("/webhooks/callrail/<tenant>")
def callrail_webhook(tenant: str) -> Response:
    """CallRail: ``Signature`` header over the raw body; kind from ``?event=`` or shape."""
    return _as_response(current_app.config["RB_INTAKE"].handle(request.environ, "callrail",
                                                                 tenant))


@bp.post("/webhooks/callingly/<tenant>")
def callingly_webhook(tenant: str) -> Response:
    """Callingly: unsigned, so ``?token=`` is compared in constant time."""
    return _as_response(current_app.config["RB_INTAKE"].handle(request.environ, "callingly",
                                                                 tenant))


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
    data, content_type = metrics.render(current_app.config["RB_REDIS"],
                                        current_app.config["RB_INTAKE"].tenants)
    return Response(data, content_type=content_type)


NOTE = "rilla_bridge.note"
_metric_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}


_WEBHOOK = re.compile(r"/webhooks/(callrail|callingly)/([^/]+)")
_STATUS_LINE = {code: f"{code} {HTTP_STATUS_CODES[code].upper()}"
                for code in (200, 202, 400, 401, 404, 413, 500, 503)}
_INTERNAL: Reply = _reply(500, "internal error")


class FrontDoor:
    """The WSGI front door. A webhook POST goes straight to ``Intake.handle`` (no Flask
    request context, routing or Response object per webhook); everything else goes through
    Flask. Either way: one log line and the intake metrics per request, whatever answered it
    (handler, error handler or router)."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], intake: Intake) -> None:
        self.wsgi_app = wsgi_app
        self.intake = intake

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        started = time.perf_counter()
        match = (_WEBHOOK.fullmatch(environ.get("PATH_INFO", ""))
                 if environ.get("REQUEST_METHOD") == "POST" else None)
        if match is not None:
            try:
                status, body, headers = self.intake.handle(environ, match[1], match[2])
            except Exception:   # as Flask's catch-all handler would: logged, a JSON 500
                log.exception("unhandled error")
                status, body, headers = _INTERNAL
            start_response(_STATUS_LINE.get(status) or f"{status} UNKNOWN", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                *headers])
            self._observe(environ, status, started)
            return [body]
        seen: list[str] = []

        def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen.append(status)
            return start_response(status, headers, exc_info)

        result = self.wsgi_app(environ, _start_response)
        self._observe(environ, int(seen[-1][:3]) if seen else 500, started)
        return result

    @staticmethod
    def _observe(environ: dict[str, Any], status: int, started: float) -> None:
        try:
            observe(environ, status, time.perf_counter() - started)
        except Exception:   # never let the log line or a metric fail a stored webhook
            log.exception("could not log or count a request")


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
            "bytes": int(length) if length and length.isascii() and length.isdigit() else None,
        })
