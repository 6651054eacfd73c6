"""The web process: ``create_app`` builds the Flask app for gunicorn (``app.wsgi:app``)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from rilla_bridge.events import EventStore
from rilla_bridge.observability import init_sentry, register_secrets, setup_logging
from rilla_bridge.redis_conn import make_redis, single_connection, warn_unless_noeviction
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant, load_tenants

log = logging.getLogger("rilla_bridge.web")


def create_app(
    settings: Settings | None = None,
    tenants: dict[str, Tenant] | None = None,
    redis_client: Any = None,
) -> Flask:
    from app import views

    settings = settings or Settings.from_env()
    tenants = load_tenants(settings.tenants_file) if tenants is None else tenants
    setup_logging()
    register_secrets(s for t in tenants.values() for s in t.secrets())
    init_sentry(settings.sentry_dsn, environment=settings.environment, component="web")
    client = redis_client if redis_client is not None else make_redis(settings)
    warn_unless_noeviction(client, log)
    # Webhooks: one connection per worker thread, not the pool (see ConnectionPerThread).
    intake_client = None if redis_client is not None else single_connection(settings)

    app = Flask(__name__)
    store = EventStore(client, dedup_window=settings.dedup_window_seconds,
                       retention=settings.event_retention_seconds,
                       intake_client=intake_client)
    intake = views.Intake(settings, tenants, store)
    app.config.update(
        RB_REDIS=client,
        RB_STORE=store,
        RB_INTAKE=intake,
        MAX_CONTENT_LENGTH=None,  # the intake view enforces the limit itself, streaming
    )
    # "//" in a webhook URL is a wrong URL (404), not a 308 redirect a sender might not follow.
    app.url_map.merge_slashes = False
    app.register_blueprint(views.bp)

    app.wsgi_app = views.FrontDoor(app.wsgi_app, intake)  # type: ignore[method-assign]

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return views.error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return views.error(500, "internal error")

    return app
