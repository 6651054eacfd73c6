"""The web process's Flask views besides webhooks (``app.door`` answers those): health,
readiness and the Prometheus metrics."""

from __future__ import annotations

import json

import redis
from flask import Blueprint, Response, current_app

from app import metrics
from app.intake import RETRY_AFTER_SECONDS, error_body

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
    """Redis answers."""
    client: redis.Redis = current_app.config["RB_REDIS"]
    try:
        client.ping()
    except redis.RedisError:
        return error(503, "redis unreachable", {"Retry-After": RETRY_AFTER_SECONDS})
    return Response(json.dumps({"status": "ready"}), mimetype="application/json")


@bp.get("/metrics")
def metrics_view() -> Response:
    """Prometheus text format: intake counters plus the system's state read from Redis."""
    data, content_type = metrics.render(current_app.config["RB_REDIS"],
                                        current_app.config["RB_TENANTS"])
    return Response(data, content_type=content_type)
