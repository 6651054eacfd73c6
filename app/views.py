"""The web process's Flask views besides webhooks (``app.door`` answers those): health,
readiness and the Prometheus metrics."""

from __future__ import annotations

import hmac
import json

import redis
from flask import Blueprint, Response, current_app, request

from app import metrics
from app.intake import RETRY_AFTER_SECONDS, error_body
from rilla_bridge import keys

bp = Blueprint("web", __name__)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON error reply (the same body as the webhook handler's)."""
    return Response(error_body(message), status=status, mimetype="application/json",
                    headers=headers)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    """Redis answers and accepts writes (a full Redis with ``noeviction`` refuses them, and
    then intake can store nothing)."""
    client: redis.Redis = current_app.config["RB_REDIS"]
    try:
        client.set(keys.READY_PROBE, "1", px=60_000)
    except redis.RedisError as exc:
        why = ("redis refuses writes (out of memory?)" if isinstance(exc, redis.ResponseError)
               else "redis unreachable")
        return error(503, why, {"Retry-After": RETRY_AFTER_SECONDS})
    return Response(json.dumps({"status": "ready"}), mimetype="application/json")


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>`` against ``token`` in constant time; an unset token
    (``ADMIN_TOKEN`` empty) refuses everything."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


@bp.get("/metrics")
def metrics_view() -> Response:
    """Prometheus text format: intake counters plus the system's state read from Redis.
    Needs ``Authorization: Bearer <ADMIN_TOKEN>`` (the tenant list is the agency's client
    list)."""
    if not bearer_ok(request.headers.get("Authorization"), current_app.config["RB_ADMIN_TOKEN"]):
        return error(401, "metrics need Authorization: Bearer <ADMIN_TOKEN>",
                     {"WWW-Authenticate": "Bearer"})
    data, content_type = metrics.render(current_app.config["RB_REDIS"],
                                        current_app.config["RB_TENANTS"],
                                        current_app.config.get("RB_QUOTA"))
    return Response(data, content_type=content_type)
