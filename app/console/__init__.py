"""The on-call console: server-rendered pages under ``/console/`` (Flask + Jinja, the CSS and
the little live-refresh script vendored in ``static/``, every page usable with JavaScript
off). Pages call ``rilla_bridge.operations`` only, as the admin API and the command line do.

Sign-in: ``ADMIN_TOKEN`` (constant-time compare) plus the operator's name, kept for the audit
log, gives a session cookie (HttpOnly, SameSite=Strict, Secure when the request came over
https, signed with a key derived from the token: changing the token signs everyone out).
Unset ``ADMIN_TOKEN`` turns the console off. Every POST carries the session's CSRF token;
failed sign-ins are counted per client address in Redis and refused past ``SIGN_IN_FAILURES``
within ``SIGN_IN_WINDOW_SECONDS``. Every console and admin API answer carries a strict
Content-Security-Policy, frame denial and ``no-store``.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from typing import Any

from flask import Flask, Response, request
from flask.sessions import SecureCookieSessionInterface
from markupsafe import Markup

from rilla_bridge.observability import redact_text
from rilla_bridge.settings import Settings

SESSION_HOURS = 12
SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW_SECONDS = 900

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; connect-src 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class Revealed(str):
    """A string a page may show as it is (the Callingly URL an operator asked to see)."""

    __slots__ = ()


def https() -> bool:
    """The operator's request came over https (directly, or through Heroku's router)."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.is_secure or proto == "https"


class _Sessions(SecureCookieSessionInterface):
    def get_cookie_secure(self, app: Flask) -> bool:
        return https()


def _finalize(value: Any) -> Any:
    # Whatever a template prints goes through the secrets filter, but an asked-for reveal
    # and the markup the console drew itself (the charts).
    if isinstance(value, str) and not isinstance(value, Revealed | Markup):
        return redact_text(value)
    return value


def install(app: Flask, settings: Settings) -> None:
    from app.console import pages

    token = settings.admin_token
    app.secret_key = hmac.new(token.encode() or b"unset", b"rilla-bridge console session",
                              hashlib.sha256).hexdigest()
    app.session_interface = _Sessions()
    app.config.update(
        SESSION_COOKIE_NAME="rb_console", SESSION_COOKIE_PATH="/console",
        SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS))
    app.jinja_env.finalize = _finalize
    app.jinja_env.filters.update(pages.FILTERS)
    app.register_blueprint(pages.bp)

    @app.after_request
    def _headers(resp: Response) -> Response:
        if request.path.startswith(("/console", "/admin/")):
            for name, value in SECURITY_HEADERS.items():
                resp.headers.setdefault(name, value)
        return resp
