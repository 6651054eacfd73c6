"""The admin JSON API under ``/admin/api/`` (SPEC): every console query and action, for
scripts and for operators without a browser. ``Authorization: Bearer <ADMIN_TOKEN>``
(compared in constant time; unset ``ADMIN_TOKEN`` refuses everything); the optional
``X-Operator`` header names the person for the audit log. Each route is declared once in
``ROUTES``, which both registers it and describes it in ``/admin/api/openapi.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import BadRequest, NotFound

from app import admin
from app.views import bearer_ok, error
from rilla_bridge.jobs import JobError

bp = Blueprint("admin_api", __name__, url_prefix="/admin/api")
_OPERATOR = re.compile(r"[^A-Za-z0-9 ._@-]")


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status=status, mimetype="application/json")


def actor() -> str:
    name = _OPERATOR.sub("", request.headers.get("X-Operator", ""))[:64].strip()
    return f"api:{name}" if name else "api"


@bp.before_request
def _authorize() -> Response | None:
    if not bearer_ok(request.headers.get("Authorization"), current_app.config["RB_ADMIN_TOKEN"]):
        why = ("the admin API is off (ADMIN_TOKEN is not set)"
               if not current_app.config["RB_ADMIN_TOKEN"]
               else "the admin API needs Authorization: Bearer <ADMIN_TOKEN>")
        return error(401, why, {"WWW-Authenticate": "Bearer"})
    return None


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


# -- views ------------------------------------------------------------------------------------
def overview() -> Response:
    return _json(admin.operations().overview())


def list_events() -> Response:
    ops = admin.operations()
    page = ops.events(admin.event_filter(request.args, ops.clock.now()),
                      admin.limit(request.args), request.args.get("before") or None)
    return _json({"events": page.rows, "next": page.next})


def show_event(event_id: str) -> Response:
    found = admin.operations().event_detail(event_id)
    if found is None:
        raise NotFound(f"no event {event_id}")
    return _json(found)


def redeliver(event_id: str) -> Response:
    try:
        what = admin.operations().redeliver(event_id, actor())
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    return _json({"event": event_id, "result": what})


def groups() -> Response:
    return _json({"groups": admin.operations().dead_letter_groups()})


def list_dead_letters() -> Response:
    page = admin.operations().dead_letters(admin.dead_letter_filter(request.args),
                                           admin.limit(request.args, 100),
                                           request.args.get("after") or None)
    return _json({"dead_letters": page.rows, "next": page.next})


def export() -> Response:
    try:
        lines = admin.operations().export(_body().get("selection") or {}, actor())
    except JobError as exc:
        raise BadRequest(str(exc)) from None
    return Response(lines, mimetype="application/x-ndjson",
                    headers={"Content-Disposition": "attachment; filename=dead-letters.jsonl"})


def plan_job() -> Response:
    body = _body()
    try:
        job = admin.operations().plan(str(body.get("action")), body.get("selection") or {},
                                      actor())
    except JobError as exc:
        raise BadRequest(str(exc)) from None
    return _json(job, 201)


def list_jobs() -> Response:
    return _json({"jobs": admin.operations().jobs(admin.limit(request.args, 20))})


def show_job(job_id: str) -> Response:
    job = admin.operations().job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return _json(job)


def _job_action(run: Callable[[str, str], dict[str, Any]], job_id: str) -> Response:
    try:
        return _json(run(job_id, actor()))
    except JobError as exc:
        return error(409, str(exc))


def confirm_job(job_id: str) -> Response:
    return _job_action(admin.operations().confirm, job_id)


def cancel_job(job_id: str) -> Response:
    return _job_action(admin.operations().cancel, job_id)


def retries() -> Response:
    return _json({"retries": admin.operations().retries(
        request.args.get("tenant") or None, limit=admin.limit(request.args, 100))})


def retry_now(event_id: str) -> Response:
    if not admin.operations().retry_event_now(event_id, actor()):
        return error(409, f"{event_id} is not waiting for a retry")
    return _json({"event": event_id, "result": "queued now"})


def tenants() -> Response:
    return _json({"tenants": admin.operations().tenants_info(admin.base_url())})


def _tenant_action(slug: str, pause: bool) -> Response:
    ops = admin.operations()
    try:
        if pause:
            ops.pause(slug, actor())
        else:
            ops.resume(slug, actor())
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    return _json({"tenant": slug, "paused": pause})


def pause(slug: str) -> Response:
    return _tenant_action(slug, True)


def resume(slug: str) -> Response:
    return _tenant_action(slug, False)


def callingly_url(slug: str) -> Response:
    try:
        url = admin.operations().callingly_url(slug, admin.base_url(), actor())
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    resp = _json({"tenant": slug, "callingly_url": url})
    resp.headers["Cache-Control"] = "no-store"
    return resp


def audit() -> Response:
    return _json({"audit": admin.operations().audit_log(admin.limit(request.args, 100))})


def openapi() -> Response:
    return _json(openapi_document())


# -- the route table and its OpenAPI description ----------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str
    path: str                  # OpenAPI form: /events/{event_id}
    view: Callable[..., Response]
    summary: str
    query: tuple[str, ...] = ()
    body: str = ""             # a description of the JSON body, when it takes one
    action: bool = False       # changes something (audited)


_EVENT_Q = ("tenant", "source", "kind", "status", "since", "until", "phone", "name",
            "rep_email", "call_id", "event_id", "limit", "before")
_DL_Q = ("tenant", "source", "reason", "group_tenant", "group_reason", "group_status", "limit",
         "after")
_SELECTION = ('selection: {"ids": [event ids]} | {"group": {"tenant", "reason_code", '
              '"status_code"}} | {"filter": {"tenant", "source", "reason"}}')

ROUTES = (
    Route("GET", "/overview", overview, "Per tenant and total: last hour and day counts, queue "
          "depths, oldest pending, retries, CallRail budgets, silent tenants, per-minute series"),
    Route("GET", "/events", list_events, "Search events, newest first (phone in any format; "
          "name is a substring within since/until, default the last 7 days)", _EVENT_Q),
    Route("GET", "/events/{event_id}", show_event, "One event: timeline, dead letters, raw "
          "event and last payload (secrets masked), call state, the call's other events"),
    Route("POST", "/events/{event_id}/redeliver", redeliver, "Deliver the event again now",
          action=True),
    Route("GET", "/dead-letters/groups", groups,
          "Open dead letters grouped by tenant x reason x Rilla status"),
    Route("GET", "/dead-letters", list_dead_letters, "Open dead letters, oldest failure first",
          _DL_Q),
    Route("POST", "/dead-letters/export", export, "The selected open dead letters as JSON "
          "Lines", body=_SELECTION, action=True),
    Route("POST", "/jobs", plan_job, "Plan a bulk replay or delete (nothing runs until "
          "confirmed): how many, which tenants, a sample",
          body='action: "replay" | "delete"; ' + _SELECTION, action=True),
    Route("GET", "/jobs", list_jobs, "Recent bulk jobs, newest first", ("limit",)),
    Route("GET", "/jobs/{job_id}", show_job, "One job: status and progress"),
    Route("POST", "/jobs/{job_id}/confirm", confirm_job, "Run a planned job in the background "
          "(replays at BULK_RATE_PER_SECOND)", action=True),
    Route("POST", "/jobs/{job_id}/cancel", cancel_job, "Cancel a job (a running one stops "
          "before its next event)", action=True),
    Route("GET", "/retries", retries, "Scheduled retries, soonest first", ("tenant", "limit")),
    Route("POST", "/retries/{event_id}/retry-now", retry_now, "Retry now", action=True),
    Route("GET", "/tenants", tenants, "Tenants: webhook URLs (token masked), masked secrets, "
          "last webhook per source, success rate, CallRail budget, pause"),
    Route("POST", "/tenants/{slug}/pause", pause, "Pause delivery for a tenant (events keep "
          "arriving and wait)", action=True),
    Route("POST", "/tenants/{slug}/resume", resume, "Resume delivery (the waiting events "
          "drain through the lanes)", action=True),
    Route("POST", "/tenants/{slug}/callingly-url", callingly_url, "The Callingly webhook URL "
          "with its token (shown on this request only; audited)", action=True),
    Route("GET", "/audit", audit, "Operator actions, newest first", ("limit",)),
    Route("GET", "/openapi.json", openapi, "This document"),
)


def _flask_path(path: str) -> str:
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


for _r in ROUTES:
    bp.add_url_rule(_flask_path(_r.path), f"{_r.method.lower()}{_r.path}".replace(".", "_"),
                    admin.limited(_r.view), methods=[_r.method])


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in ROUTES:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"\{(\w+)\}", r.path)]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                   for n in r.query]
        op: dict[str, Any] = {
            "summary": r.summary, "operationId": f"{r.method.lower()}{r.path}",
            "parameters": params,
            "responses": {"200": {"description": "OK", "content": {"application/json": {}}},
                          "401": {"description": "no or wrong token, or ADMIN_TOKEN unset"}}}
        if r.body:
            op["requestBody"] = {"required": True, "description": r.body, "content": {
                "application/json": {"schema": {"type": "object"}}}}
            op["responses"]["400"] = {"description": "a bad body"}
        if "{" in r.path:
            op["responses"]["404"] = {"description": "not found"}
        if r.action:
            op["description"] = "Recorded in the audit log (X-Operator names who)."
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "rilla-bridge admin API", "version": "1",
                 "description": "The on-call console's queries and actions. Times are epoch "
                                "seconds (UTC); since/until also take ISO dates or ages (6h)."},
        "servers": [{"url": "/admin/api"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "parameters": {}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
