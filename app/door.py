"""The WSGI front door of the web process: webhooks answered here, everything else by Flask.

A webhook POST is read (bounded by the size limit) and handed straight to
``app.intake.Intake``: no Flask request context, routing or Response object per webhook, which
is most of intake's cost otherwise. Every request, whoever answered it, gets one log line and
the intake metrics; neither ever holds the query string (Callingly's token), a header or the
body.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_input_stream

from app import metrics
from app.intake import Intake, Reply, WebhookRequest, error_body

log = logging.getLogger("rilla_bridge.web")
WEBHOOK_PATH = re.compile(r"/webhooks/(callrail|callingly)/([^/]+)")
_STATUS_LINE = {code: f"{code} {HTTP_STATUS_CODES[code].upper()}"
                for code in (200, 202, 400, 401, 404, 405, 408, 413, 429, 500, 503)}
_INTERNAL = Reply(500, error_body("internal error"))
_metric_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}


class UnreadableBody(Exception):
    """The whole body could not be read: a broken chunked encoding, a client that hung up,
    or whatever else the server's input stream raised. The message is safe to log: it never
    holds body bytes (a server's own exception text may, so only its type name is kept)."""

    status = 400


class ShortBody(UnreadableBody):
    """The client sent fewer bytes than its Content-Length."""

    def __init__(self) -> None:
        super().__init__("body shorter than its Content-Length")


class BodyTimeout(UnreadableBody):
    """The body did not arrive within the server's read deadline."""

    status = 408


def read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (never reading more than limit + 1 bytes).
    werkzeug's input stream: bounded by Content-Length, or read to EOF when the server says
    the input is terminated (chunked bodies), else empty. Raises ``UnreadableBody`` when the
    stream fails, whatever the server's own exception was."""
    try:
        return _read_body(environ, limit)
    except UnreadableBody:
        raise
    except Exception as exc:   # gunicorn's InvalidChunkSize/NoMoreData, OSError, ...: their
        # text can quote the raw bytes they choked on, so only the type name goes on
        raise UnreadableBody(f"body could not be read ({type(exc).__name__})") from None


def _read_body(environ: dict[str, Any], limit: int) -> bytes | None:
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


def client_address(environ: dict[str, Any], trust_forwarded_for: bool) -> str:
    """The client's address: the connection's peer, or behind a proxy that appends the peer
    it saw to ``X-Forwarded-For`` (Heroku's router), that header's last entry (the entries
    before it are whatever the client wrote)."""
    if trust_forwarded_for:
        forwarded: str = environ.get("HTTP_X_FORWARDED_FOR", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return str(environ.get("REMOTE_ADDR") or "")


def _query(environ: dict[str, Any]) -> dict[str, list[str]]:
    qs = environ.get("QUERY_STRING")
    return parse_qs(qs, keep_blank_values=True) if qs else {}


class FrontDoor:
    """WSGI middleware in front of the Flask app (see the module docstring)."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], intake: Intake,
                 max_body_bytes: int, trust_forwarded_for: bool = False) -> None:
        self.wsgi_app = wsgi_app
        self.intake = intake
        self.max_body_bytes = max_body_bytes
        self.trust_forwarded_for = trust_forwarded_for

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        started = time.perf_counter()
        match = WEBHOOK_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None:
            seen: list[str] = []

            def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
                seen.append(status)
                return start_response(status, headers, exc_info)

            result = self.wsgi_app(environ, _start_response)
            self._observe(environ, None, int(seen[-1][:3]) if seen else 500, started)
            return result
        source = match[1]
        try:
            reply = self._webhook(environ, source, match[2])
        except Exception:   # as Flask's catch-all handler would: logged, a JSON 500
            log.exception("unhandled error")
            reply = _INTERNAL
        start_response(_STATUS_LINE.get(reply.status) or f"{reply.status} UNKNOWN", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(reply.body))),
            *reply.headers])
        self._observe(environ, (source, reply), reply.status, started)
        return [reply.body]

    def _webhook(self, environ: dict[str, Any], source: str, tenant: str) -> Reply:
        if environ.get("REQUEST_METHOD") != "POST":
            return Reply(405, error_body("webhooks are POST requests"), (("Allow", "POST"),))
        limit = self.max_body_bytes
        try:
            body = read_body(environ, limit)
        except UnreadableBody as exc:
            # the rest of the request may still be on the wire: close the connection
            return Reply(exc.status, error_body(str(exc)), (("Connection", "close"),))
        if body is None:
            return Reply(413, error_body(f"body over {limit} bytes"), (("Connection", "close"),))
        return self.intake.handle(WebhookRequest(
            source=source, tenant=tenant, body=body, query=_query(environ),
            signature=environ.get("HTTP_SIGNATURE"),
            client=client_address(environ, self.trust_forwarded_for)))

    @staticmethod
    def _observe(environ: dict[str, Any], webhook: tuple[str, Reply] | None, status: int,
                 started: float) -> None:
        try:
            observe(environ, webhook, status, time.perf_counter() - started)
        except Exception:   # never let the log line or a metric fail a stored webhook
            log.exception("could not log or count a request")


def _path(environ: dict[str, Any]) -> str:
    """PATH_INFO as the client sent it (WSGI hands it over as latin-1 decoded bytes)."""
    raw: str = environ.get("PATH_INFO", "")
    return raw if raw.isascii() else raw.encode("latin-1", "replace").decode("utf-8", "replace")


def observe(environ: dict[str, Any], webhook: tuple[str, Reply] | None, status: int,
            elapsed: float) -> None:
    """One log line per request and the intake metrics; never the query string or headers."""
    source = tenant = kind = event_id = None
    if webhook is not None:
        source, reply = webhook
        tenant, kind, event_id = reply.tenant, reply.kind, reply.event_id
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
            "tenant": tenant, "kind": kind, "event_id": event_id,
            "bytes": int(length) if length and length.isascii() and length.isdigit() else None,
        })
