"""Bare intake baseline: a Flask app whose only work is LPUSHing the raw body to Redis.

    gunicorn -w N -k sync|gthread [--threads T] bench.baseline_app:app
"""

from __future__ import annotations

import os

import redis
from flask import Flask, Response, request

app = Flask(__name__)
_redis = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))


@app.post("/webhooks/callrail/<tenant>")
def intake(tenant: str) -> Response:
    _redis.lpush("bench:baseline", request.get_data())
    return Response('{"status": "queued"}', status=202, mimetype="application/json")


@app.get("/healthz")
def healthz() -> Response:
    return Response('{"status": "ok"}', mimetype="application/json")
