"""The web process: ``create_app`` builds the Flask app for the WSGI server (``app.wsgi:app``).

Webhooks are answered by the front door (``app.door``, handler in ``app.intake``) before Flask;
Flask serves the other views (``app.views``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException

from app import admin, admin_api, console, views
from app.door import FrontDoor
from app.intake import Intake
from rilla_bridge.clock import Clock, SystemClock
from rilla_bridge.history.db import make_engine
from rilla_bridge.lifecycle import make_lifecycle
from rilla_bridge.observability import init_sentry, register_secrets, setup_logging
from rilla_bridge.operations import Operations
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.redis_conn import make_redis, single_connection, warn_unless_noeviction
from rilla_bridge.settings import Settings
from rilla_bridge.tenant_config import TenantsReloader, live_tenants
from rilla_bridge.tenants import Tenant

log = logging.getLogger("rilla_bridge.web")


def create_app(
    settings: Settings | None = None,
    tenants: Mapping[str, Tenant] | None = None,
    redis_client: Any = None,
    clock: Clock | None = None,
    engine: Engine | None = None,
) -> Flask:
    """The web app. Tests pass settings, tenants, a (fake) Redis client, a clock and the
    history database's engine (else one is made from ``DATABASE_URL`` on the first console
    or admin API request). Without ``tenants`` the configuration is the settings'
    (TENANTS_TOML or TENANTS_FILE), and a changed tenants file is picked up without a
    restart (``rilla_bridge.tenant_config``)."""
    settings = settings or Settings.from_env()
    setup_logging()
    live = live_tenants(settings) if tenants is None else None
    tenants = live if live is not None else tenants
    assert tenants is not None
    register_secrets(s for t in tenants.values() for s in t.secrets())
    init_sentry(settings.sentry_dsn, environment=settings.environment, component="web")
    client = redis_client if redis_client is not None else make_redis(settings)
    warn_unless_noeviction(client, log)
    # Webhooks: one connection per worker thread, not the pool (see ConnectionPerThread).
    intake_client = None if redis_client is not None else single_connection(settings)
    clock = clock or SystemClock()
    lifecycle = make_lifecycle(client, clock, settings, tenants, intake_client=intake_client)

    def make_operations() -> Operations:
        return Operations(settings, client, engine or make_engine(settings), clock, tenants,
                          lifecycle)

    app = Flask(__name__)
    app.config.update(
        RB_REDIS=client,
        RB_TENANTS=tenants,
        RB_ADMIN_TOKEN=settings.admin_token,
        RB_LIFECYCLE=lifecycle,
        RB_MAKE_OPERATIONS=make_operations,
        RB_PUBLIC_URL=settings.public_url,
        RB_TRUST_FORWARDED_FOR=settings.trust_forwarded_for,
        # /metrics reads each CallRail account's budget through the guard's own script.
        RB_QUOTA=QuotaGuard.from_settings(settings, client, lifecycle.scripts, clock),
        MAX_CONTENT_LENGTH=None,  # the front door enforces the limit on webhooks, streaming
    )
    # "//" in a URL is a wrong URL (404), not a 308 redirect a sender might not follow.
    app.url_map.merge_slashes = False
    app.register_blueprint(views.bp)
    admin.install(app)
    app.register_blueprint(admin_api.bp)
    console.install(app, settings)
    intake = Intake(tenants, lifecycle, settings)
    if live is not None:
        TenantsReloader(settings, live, clock or SystemClock(), client=client,
                        process="web").start()
    app.wsgi_app = FrontDoor(  # type: ignore[method-assign]
        app.wsgi_app, intake, settings.max_body_bytes, settings.trust_forwarded_for)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return views.error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return views.error(500, "internal error")

    return app
