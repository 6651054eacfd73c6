"""The console's pages: sign-in, overview, events, dead letters and bulk jobs, retries,
tenants, audit log. Each view reads or acts through ``app.admin.operations()``."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import redis
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from werkzeug.exceptions import BadRequest, NotFound
from werkzeug.wrappers import Response as BaseResponse

from app import admin, door
from app.console import SIGN_IN_FAILURES, SIGN_IN_WINDOW_SECONDS, Revealed
from app.console.chart import chart_svg
from rilla_bridge import keys
from rilla_bridge.jobs import JobError

F = TypeVar("F", bound=Callable[..., Any])
bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static")


# -- filters ----------------------------------------------------------------------------------
def when(ts: Any) -> str:
    if ts in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: Any) -> str:
    if seconds in (None, ""):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


FILTERS = {"when": when, "age": age}


# -- access -----------------------------------------------------------------------------------
def client_address() -> str:
    """Who is signing in: the connection's peer, or with ``TRUST_FORWARDED_FOR`` (behind
    Heroku's router) the last ``X-Forwarded-For`` entry, as the front door decides."""
    return door.client_address(request.environ,
                               bool(current_app.config.get("RB_TRUST_FORWARDED_FOR"))
                               ) or "unknown"


def _token() -> str:
    return cast(str, current_app.config["RB_ADMIN_TOKEN"])


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return cast(str, session["csrf"])


@bp.app_context_processor
def _context() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "operator": session.get("operator")}


@bp.before_request
def _guard() -> BaseResponse | None:
    if not _token():
        abort(403, "the console is off (ADMIN_TOKEN is not set)")
    if request.endpoint == "console.static":
        return None
    if request.method == "POST":
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, str(session.get("csrf", ""))):
            abort(403, "this form has expired or did not come from the console: reload the "
                  "page and try again")
    if request.endpoint not in ("console.sign_in",) and not session.get("operator"):
        return redirect(url_for("console.sign_in", next=request.full_path))
    return None


def actor() -> str:
    return f"console:{session.get('operator')}"


def page(view: F) -> F:
    return admin.limited(view)


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Any:
    error = None
    status = 200
    if request.method == "POST":
        address = client_address()
        client: redis.Redis = current_app.config["RB_REDIS"]
        failures = int(client.get(keys.sign_in_failures(address)) or 0)
        name = " ".join(request.form.get("operator", "").split())[:64]
        token = request.form.get("token", "")
        if failures >= SIGN_IN_FAILURES:
            error, status = ("too many failed sign-ins from your address; wait 15 minutes",
                             429)
        elif not name:
            error, status = "give your name (it goes in the audit log)", 400
        elif hmac.compare_digest(token.encode(), _token().encode()):
            session.clear()
            session.permanent = True
            session["operator"] = name
            session["csrf"] = secrets.token_urlsafe(24)
            admin.operations().sign_in(f"console:{name}", address)
            target = request.args.get("next") or ""
            return redirect(target if target.startswith("/console/") else
                            url_for("console.overview"))
        else:
            with client.pipeline() as pipe:
                pipe.incr(keys.sign_in_failures(address))
                pipe.expire(keys.sign_in_failures(address), SIGN_IN_WINDOW_SECONDS)
                pipe.execute()
            error, status = "wrong token", 401
    return render_template("sign_in.html", error=error), status


@bp.post("/sign-out")
def sign_out() -> BaseResponse:
    session.clear()
    return redirect(url_for("console.sign_in"))


# -- overview ---------------------------------------------------------------------------------
# The charts of the overview this process last drew, by the overview's time: the overview is
# cached for 10 s, and drawing 20 busy tenants' charts costs ~30 ms of the GIL webhooks share.
_drawn: list[tuple[Any, dict[str, Any]]] = [(None, {})]


def _charts(data: dict[str, Any]) -> dict[str, Any]:
    # The same overview (cached) is the same series object; its time tells a recycled id.
    at = (data["now"], data["chart"]["start"], id(data["chart"]["series"]))
    drawn_at, charts = _drawn[0]
    if drawn_at != at:
        charts = {t: chart_svg(t, s, data["chart"]["start"])
                  for t, s in sorted(data["chart"]["series"].items())}
        _drawn[0] = (at, charts)   # one assignment: a thread sees the old pair or the new
    return charts


@bp.get("/")
@page
def overview() -> str:
    data = admin.operations().overview()
    return render_template("overview.html", d=data, charts=_charts(data), refresh=30)


# -- events -----------------------------------------------------------------------------------
@bp.get("/events")
@page
def events() -> str:
    ops = admin.operations()
    args = request.args
    searched = any((args.get(k) or "").strip() for k in (
        "tenant", "source", "kind", "status", "since", "until", "phone", "name", "rep_email",
        "call_id", "event_id"))
    page_ = ops.events(admin.event_filter(args, ops.clock.now()), admin.limit(args),
                       args.get("before") or None)
    more = {k: v for k, v in args.items() if k != "before"}
    return render_template("events.html", rows=page_.rows, next=page_.next, args=args,
                           more=more, searched=searched, tenants=sorted(ops.tenants))


@bp.get("/events/<event_id>")
@page
def event(event_id: str) -> str:
    found = admin.operations().event_detail(event_id)
    if found is None:
        raise NotFound(f"no event {event_id} in the history")
    return render_template("event.html", e=found, ev=found["event"],
                           message=request.args.get("message"))


@bp.post("/events/<event_id>/redeliver")
@page
def redeliver(event_id: str) -> BaseResponse:
    try:
        what = admin.operations().redeliver(event_id, actor())
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    return redirect(url_for("console.event", event_id=event_id, message=what))


# -- dead letters -----------------------------------------------------------------------------
@bp.get("/dead-letters")
@page
def dead_letters() -> str:
    ops = admin.operations()
    return render_template("dead_letters.html", groups=ops.dead_letter_groups(),
                           jobs=ops.jobs(10), tenants=sorted(ops.tenants))


@bp.get("/dead-letters/list")
@page
def dead_letter_list() -> str:
    ops = admin.operations()
    args = request.args
    f = admin.dead_letter_filter(args)
    page_ = ops.dead_letters(f, admin.limit(args, 100), args.get("after") or None)
    more = {k: v for k, v in args.items() if k != "after"}
    return render_template("dead_letter_list.html", rows=page_.rows, next=page_.next,
                           args=args, more=more, group=f.group)


def _selection(form: Any) -> dict[str, Any]:
    scope = form.get("scope")
    if scope == "selected":
        ids = [i for i in form.getlist("id") if i]
        if not ids:
            raise BadRequest("tick at least one dead letter")
        return {"ids": ids}
    if scope == "group":
        return {"group": {"tenant": form.get("group_tenant"),
                          "reason_code": form.get("group_reason"),
                          "status_code": form.get("group_status") or None}}
    if scope == "filter":
        return {"filter": {k: form.get(k) or None for k in ("tenant", "source", "reason")}}
    raise BadRequest("scope must be selected, group or filter")


@bp.post("/dead-letters/act")
@page
def act() -> BaseResponse:
    ops = admin.operations()
    action = request.form.get("action", "")
    try:
        selection = _selection(request.form)
        if action == "export":
            lines = ops.export(selection, actor())
            return Response(stream_with_context(lines), mimetype="application/x-ndjson",
                            headers={"Content-Disposition":
                                     "attachment; filename=dead-letters.jsonl"})
        job = ops.plan(action, selection, actor())
    except JobError as exc:
        raise BadRequest(str(exc)) from None
    session[f"plan:{job['id']}"] = {"tenants": job["tenants"], "sample": job["sample"]}
    return redirect(url_for("console.job", job_id=job["id"]))


@bp.get("/jobs/<job_id>")
@page
def job(job_id: str) -> str:
    found = admin.operations().job(job_id)
    if found is None:
        raise NotFound(f"no job {job_id}")
    plan = session.get(f"plan:{job_id}") or {}
    live = found["status"] in ("queued", "running")
    return render_template("job.html", job=found, plan=plan, refresh=2 if live else None)


@bp.post("/jobs/<job_id>/<what>")
@page
def job_action(job_id: str, what: str) -> BaseResponse:
    ops = admin.operations()
    run = {"confirm": ops.confirm, "cancel": ops.cancel}.get(what)
    if run is None:
        raise NotFound()
    try:
        run(job_id, actor())
    except JobError as exc:
        abort(409, str(exc))
    session.pop(f"plan:{job_id}", None)
    return redirect(url_for("console.job", job_id=job_id))


# -- retries, tenants, audit ------------------------------------------------------------------
@bp.get("/retries")
@page
def retries() -> str:
    ops = admin.operations()
    return render_template("retries.html", rows=ops.retries(limit=200), now=ops.clock.now(),
                           message=request.args.get("message"))


@bp.post("/retries/<event_id>/now")
@page
def retry_now(event_id: str) -> BaseResponse:
    done = admin.operations().retry_event_now(event_id, actor())
    return redirect(url_for("console.retries", message=f"{event_id}: " + (
        "queued now" if done else "not waiting for a retry any more")))


@bp.get("/tenants")
@page
def tenants() -> str:
    ops = admin.operations()
    return render_template("tenants.html", rows=ops.tenants_info(admin.base_url()),
                           now=ops.clock.now(), revealed=None,
                           message=request.args.get("message"))


@bp.post("/tenants/<slug>/<what>")
@page
def tenant_action(slug: str, what: str) -> Any:
    ops = admin.operations()
    try:
        if what == "pause":
            ops.pause(slug, actor())
        elif what == "resume":
            ops.resume(slug, actor())
        elif what == "reveal":
            url = ops.callingly_url(slug, admin.base_url(), actor())
            return render_template("tenants.html", rows=ops.tenants_info(admin.base_url()),
                                   now=ops.clock.now(), revealed=(slug, Revealed(url)),
                                   message=None)
        else:
            raise NotFound()
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    return redirect(url_for("console.tenants", message=f"{slug}: {what}d"))


@bp.get("/audit")
@page
def audit() -> str:
    return render_template("audit.html",
                           rows=admin.operations().audit_log(admin.limit(request.args, 200)))
