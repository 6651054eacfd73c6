"""A faithful local stand-in for Rilla's Custom CRM API, with a control API for tests.

Run it as ``python -m sandbox.rilla --port 8089 --org KEY[=a@x,b@y]``.
The Custom CRM endpoints answer exactly as the seed documents (plain-text bodies,
``{"message": ...}`` on success when ``Accept: application/json``). The control API
under ``/_sandbox/`` (JSON, unauthenticated; bind to loopback) manages orgs, faults,
latency and conversations and exposes what was received. Control requests are neither
delayed, faulted, counted nor logged.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from http import HTTPStatus
from typing import Any

import gevent
import gevent.socket
from flask import Flask, Response, g, jsonify, request
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from sandbox.rilla_state import (
    BAD_KEY,
    INVALID_JSON,
    Fault,
    SandboxError,
    SandboxState,
    mask_key,
)

__all__ = ["BAD_KEY", "Fault", "SandboxState", "main", "make_app", "mask_key", "run_server"]

CONTROL_PREFIX = "/_sandbox/"


def _reply(status: int, message: str) -> Response:
    """Success honours Accept: application/json; errors are always plain text."""
    accept = request.accept_mimetypes
    if status == 200 and accept["application/json"] > accept["text/plain"]:
        return Response(json.dumps({"message": message}), status, mimetype="application/json")
    return Response(message, status, mimetype="text/plain")


def _json_body() -> dict[str, Any]:
    """The request body as a JSON object, else 400 'Invalid JSON data'."""
    if request.mimetype != "application/json":
        raise SandboxError(400, INVALID_JSON)
    try:
        body = json.loads(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError):
        raise SandboxError(400, INVALID_JSON) from None
    if not isinstance(body, dict):
        raise SandboxError(400, INVALID_JSON)
    event_id = body.get("event_id")
    g.event_id = event_id if isinstance(event_id, str) else None
    return body


def _control_json() -> dict[str, Any]:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def make_app(state: SandboxState) -> Flask:
    """The sandbox as a Flask app over ``state`` (shared by every request)."""
    app = Flask("rilla_sandbox")
    app.config["SANDBOX_STATE"] = state

    @app.errorhandler(SandboxError)
    def _sandbox_error(exc: SandboxError) -> Response:
        return Response(exc.body, exc.status, mimetype="text/plain")

    @app.before_request
    def _begin() -> None:
        if not request.path.startswith(CONTROL_PREFIX):
            g.counted = True
            state.begin()

    @app.teardown_request
    def _end(_: BaseException | None) -> None:
        if g.pop("counted", False):
            state.end()

    @app.before_request
    def _faults_and_latency() -> Response | None:
        if request.path.startswith(CONTROL_PREFIX):
            return None
        g.event_id = None
        fault, delay = state.take_fault(request.headers.get("x-api-key"))
        if delay > 0:
            gevent.sleep(delay)
        if fault is None or fault.status is None:
            return None
        body = fault.body if fault.body is not None else _phrase(fault.status)
        response = Response(body, fault.status, mimetype="text/plain")
        if fault.retry_after is not None:
            response.headers["Retry-After"] = fault.retry_after
        return response

    @app.after_request
    def _record(response: Response) -> Response:
        if not request.path.startswith(CONTROL_PREFIX):
            event_id = g.get("event_id") or (request.view_args or {}).get("event_id")
            if event_id is None and request.method == "POST":
                try:
                    body = json.loads(request.get_data(cache=True) or b"null")
                except (ValueError, UnicodeDecodeError):
                    body = None
                if isinstance(body, dict) and isinstance(body.get("event_id"), str):
                    event_id = body["event_id"]
            state.record(request.method, request.path, response.status_code, event_id)
        return response

    # -- Custom CRM API ----------------------------------------------------------------

    @app.post("/custom/appointment")
    def upsert() -> Response:
        body = _json_body()
        key = state.check_key(request.headers.get("x-api-key"))
        return _reply(200, state.upsert(key, body))

    @app.delete("/custom/appointment/<path:event_id>")
    def delete(event_id: str) -> Response:
        key = state.check_key(request.headers.get("x-api-key"))
        return _reply(200, state.delete(key, event_id))

    @app.post("/custom/appointment/match")
    def match() -> Response:
        body = _json_body()
        key = state.check_key(request.headers.get("x-api-key"))
        return _reply(200, state.match(key, body))

    # -- control API -------------------------------------------------------------------

    @app.get("/_sandbox/health")
    def health() -> Response:
        return jsonify({"ok": True})

    @app.put("/_sandbox/orgs/<api_key>")
    def put_org(api_key: str) -> Response:
        users = _control_json().get("users")
        if users is not None and not isinstance(users, list):
            return _bad("users must be a list of emails or null")
        state.set_org(api_key, users)
        return jsonify({"org": mask_key(api_key), "users": users})

    @app.post("/_sandbox/faults")
    def add_fault() -> Response:
        spec = _control_json()
        status, count = spec.get("status"), spec.get("count")
        latency = spec.get("latency_ms", 0)
        if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
            return _bad("status must be an HTTP status code or null")
        if count is not None and (not isinstance(count, int) or count < 1):
            return _bad("count must be a positive integer or null")
        if not isinstance(latency, int) or latency < 0:
            return _bad("latency_ms must be a non-negative integer")
        retry_after = spec.get("retry_after")
        state.add_fault(Fault(status=status, remaining=count, latency_ms=latency,
                              api_key=spec.get("api_key"), body=spec.get("body"),
                              retry_after=None if retry_after is None else str(retry_after)))
        return jsonify({"faults": len(state.faults)})

    @app.delete("/_sandbox/faults")
    def clear_faults() -> Response:
        state.clear_faults()
        return jsonify({"faults": 0})

    @app.post("/_sandbox/latency")
    def set_latency() -> Response:
        spec = _control_json()
        latency = spec.get("latency_ms")
        if not isinstance(latency, int) or latency < 0:
            return _bad("latency_ms must be a non-negative integer")
        state.set_latency(latency, spec.get("api_key"))
        return jsonify({"latency_ms": latency})

    @app.post("/_sandbox/conversations")
    def add_conversation() -> Response:
        spec = _control_json()
        key, conversation_id = spec.get("api_key"), spec.get("conversation_id")
        if not isinstance(key, str) or not isinstance(conversation_id, str):
            return _bad("api_key and conversation_id are required")
        state.add_conversation(key, conversation_id, bool(spec.get("has_recording", True)),
                               bool(spec.get("recording_missing", False)))
        return jsonify({"conversation_id": conversation_id})

    @app.get("/_sandbox/conversations")
    def list_conversations() -> Response:
        return jsonify(state.list_conversations(request.args.get("api_key")))

    @app.get("/_sandbox/appointments")
    def list_appointments() -> Response:
        return jsonify(state.list_appointments(request.args.get("api_key")))

    @app.get("/_sandbox/stats")
    def stats() -> Response:
        return jsonify(state.stats())

    @app.get("/_sandbox/requests")
    def recent() -> Response:
        limit = request.args.get("limit", default=100, type=int) or 0
        return jsonify(state.recent(limit))

    @app.post("/_sandbox/reset")
    def reset() -> Response:
        state.reset()
        return jsonify({"reset": True})

    return app


def _bad(message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = 400
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Sandbox fault"


def make_server(host: str, port: int, *, orgs: dict[str, list[str] | None],
                latency_ms: int = 0, verbose: bool = False) -> WSGIServer:
    """A gevent WSGI server for a fresh sandbox (not started)."""
    state = SandboxState(orgs, latency_ms=latency_ms)
    return WSGIServer(listener(host, port), make_app(state),
                      log=sys.stderr if verbose else None)


def listener(host: str, port: int, backlog: int = 1024) -> gevent.socket.socket:
    """A listening socket with TCP_NODELAY, which accepted connections inherit on Linux.

    Without it pywsgi's separate header and body writes meet the client's delayed ACK
    and every answer takes ~40 ms longer.
    """
    sock = gevent.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def run_server(host: str, port: int, *, orgs: dict[str, list[str] | None],
               latency_ms: int = 0, verbose: bool = False) -> None:
    """Serve the sandbox until SIGTERM/SIGINT; prints one line when listening."""
    server = make_server(host, port, orgs=orgs, latency_ms=latency_ms, verbose=verbose)
    server.start()
    print(f"rilla sandbox listening on http://{host}:{server.server_port}", flush=True)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    try:
        stop.wait()
    finally:
        server.stop(timeout=1)


def _parse_org(value: str) -> tuple[str, list[str] | None]:
    key, sep, users = value.partition("=")
    if not key:
        raise argparse.ArgumentTypeError("--org needs KEY or KEY=user1@x,user2@y")
    return key, [u for u in users.split(",") if u] if sep else None


CONTROL_HELP = """\
control API (JSON, no auth: keep it on loopback; these requests are never faulted, delayed
or counted). PORT below is --port (8089 under ./dev run):

  orgs       PUT  /_sandbox/orgs/KEY  {"users": ["rep@x.example"]}   add or replace an org;
             "users": null accepts any user email. Unknown keys answer 401.
  faults     POST /_sandbox/faults  {"status": 503, "count": 5}
             the next COUNT API requests (all of them when count is null or absent) answer
             STATUS with body "body" (default: the status phrase), optional "retry_after"
             (a Retry-After header), "latency_ms" (wait first) and "api_key" (only that
             org's requests). "status": null only delays. Faults queue in order.
             DELETE /_sandbox/faults          clear every fault
  latency    POST /_sandbox/latency  {"latency_ms": 100, "api_key": null}
             every API answer waits this long (one org's only, with "api_key")
  data       GET  /_sandbox/appointments[?api_key=K]   what Rilla holds
             GET  /_sandbox/requests[?limit=N]          the last requests, newest last
             GET  /_sandbox/stats       request counts, by status and by event
             POST /_sandbox/conversations  {"api_key": K, "conversation_id": C,
                                            "has_recording": true, "recording_missing": false}
             GET  /_sandbox/conversations[?api_key=K]
             POST /_sandbox/reset    forget appointments, conversations, requests,
                                     counters, faults and latencies (orgs stay)
             GET  /_sandbox/health

examples (a Rilla outage, then recovery):
  curl -s -XPOST localhost:8089/_sandbox/faults -H 'content-type: application/json' \\
       -d '{"status": 503, "count": null}'
  curl -s -XDELETE localhost:8089/_sandbox/faults
  curl -s -XPOST localhost:8089/_sandbox/latency -H 'content-type: application/json' \\
       -d '{"latency_ms": 2000}'
"""


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m sandbox.rilla``)."""
    parser = argparse.ArgumentParser(
        prog="rilla-bridge sandbox rilla",
        description="Local Rilla Custom CRM API sandbox (POST/DELETE /custom/appointment, "
                    "the conversation match), with faults and latency under your control.",
        epilog=CONTROL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--org", action="append", type=_parse_org, default=[],
                        metavar="KEY[=user1@x,user2@y]",
                        help="an org's API key, optionally with its user emails (repeatable)")
    parser.add_argument("--latency-ms", type=int, default=0,
                        help="every API answer waits this long (change it live: "
                             "POST /_sandbox/latency)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    run_server(args.host, args.port, orgs=dict(args.org), latency_ms=args.latency_ms,
               verbose=args.verbose)


if __name__ == "__main__":
    main()
