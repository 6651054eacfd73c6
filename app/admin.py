"""What the console and the admin API share: the one ``Operations`` of this web process, the
guard that keeps operator requests from taking the workers webhooks need, and the parsing of
filters and selections from a request."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from werkzeug.exceptions import BadRequest, ServiceUnavailable

from rilla_bridge.history.queries import DeadLetterFilter, EventFilter
from rilla_bridge.operations import Operations

F = TypeVar("F", bound=Callable[..., Any])

# Operator requests a web process serves at once; more wait this long, then get a 503. The
# front door answers webhooks before Flask, but a worker thread busy with a slow console
# query is one intake does not have.
OPERATOR_SLOTS = 2
OPERATOR_WAIT_SECONDS = 5.0
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def operations() -> Operations:
    ops = current_app.config.get("RB_OPERATIONS")
    if ops is None:
        ops = current_app.config["RB_MAKE_OPERATIONS"]()
        current_app.config["RB_OPERATIONS"] = ops
    return cast(Operations, ops)


def install(app: Flask) -> None:
    app.config["RB_OPERATOR_SLOTS"] = threading.BoundedSemaphore(OPERATOR_SLOTS)


def limited(view: F) -> F:
    """Run the view in one of the process's operator slots."""
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        slots: threading.BoundedSemaphore = current_app.config["RB_OPERATOR_SLOTS"]
        if not slots.acquire(timeout=OPERATOR_WAIT_SECONDS):
            raise ServiceUnavailable("the console is busy; try again in a few seconds")
        try:
            return view(*args, **kwargs)
        finally:
            slots.release()
    return cast(F, wrapper)


def base_url() -> str:
    """This service's public address: ``PUBLIC_URL``, else as the operator reached it
    (https behind a proxy)."""
    configured = cast(str, current_app.config.get("RB_PUBLIC_URL") or "")
    if configured:
        return configured
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    return f"{proto}://{request.host}"


def parse_time(text: str | None, now: float) -> float | None:
    """An epoch number, an ISO date/datetime (UTC unless it has an offset), or an age such as
    ``90m``, ``6h``, ``2d`` (that long before now)."""
    if not text or not text.strip():
        return None
    t = text.strip().lower()
    m = _RELATIVE.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(f"{text!r} is not a time (ISO date, epoch seconds, or 6h / 2d)"
                         ) from None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _opt(args: Mapping[str, str], name: str) -> str | None:
    value = (args.get(name) or "").strip()
    return value or None


def event_filter(args: Mapping[str, str], now: float) -> EventFilter:
    return EventFilter(
        tenant=_opt(args, "tenant"), source=_opt(args, "source"), status=_opt(args, "status"),
        kind=_opt(args, "kind"), since=parse_time(args.get("since"), now),
        until=parse_time(args.get("until"), now), phone=_opt(args, "phone"),
        name=_opt(args, "name"), rep_email=_opt(args, "rep_email"),
        call_id=_opt(args, "call_id"), event_id=_opt(args, "event_id"))


def group_of(args: Mapping[str, str]) -> tuple[str, str, int | None] | None:
    tenant, code = _opt(args, "group_tenant"), _opt(args, "group_reason")
    if not tenant or not code:
        return None
    status = _opt(args, "group_status")
    try:
        return tenant, code, None if status in (None, "none") else int(str(status))
    except ValueError:
        raise BadRequest("group_status must be a number or none") from None


def dead_letter_filter(args: Mapping[str, str]) -> DeadLetterFilter:
    return DeadLetterFilter(tenant=_opt(args, "tenant"), source=_opt(args, "source"),
                            reason=_opt(args, "reason"), group=group_of(args))


def limit(args: Mapping[str, str], default: int = 50) -> int:
    try:
        return max(1, min(500, int(args.get("limit") or default)))
    except ValueError:
        raise BadRequest("limit must be a number") from None
