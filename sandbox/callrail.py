"""A CallRail API v3 stand-in for tests and benchmarks (never used in production).

Quota: per account, ROLLING windows (any ``hour_seconds`` interval holds at most
``hourly_limit`` served requests, likewise for the day). Rolling is the stricter reading of
CallRail's undocumented window, so a client that never gets a 429 here would not get one from
clock-hour windows either. Requests answered 429 or 401 do not count against the quota.

Control API (no auth): ``POST /_sandbox/accounts/<id>`` ``{"api_key", "calls": [...]}``,
``POST /_sandbox/force_429`` ``{"account_id", "count"}``, ``GET /_sandbox/stats[?times=1]``,
``POST /_sandbox/reset``. Run: ``python -m sandbox.callrail --port N ...``.
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, jsonify, request

DEFAULT_FIELDS = (
    "answered", "business_phone_number", "customer_city", "customer_country", "customer_name",
    "customer_phone_number", "customer_state", "direction", "duration", "id", "recording",
    "recording_duration", "recording_player", "start_time", "tracking_phone_number", "voicemail",
)


@dataclass
class Account:
    api_key: str
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    hour: deque[float] = field(default_factory=deque)
    day: deque[float] = field(default_factory=deque)
    force_429: int = 0
    requests: int = 0
    served_429: int = 0
    # (arrival time, status) of recent requests, for tests and benchmarks (bounded).
    log: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=100_000))


@dataclass
class SandboxState:
    """Everything the sandbox knows; guarded by ``lock``."""

    hourly_limit: int = 1000
    daily_limit: int = 10000
    hour_seconds: float = 3600.0
    day_seconds: float = 86400.0
    accounts: dict[str, Account] = field(default_factory=dict)
    requests: int = 0
    served_429: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, acct: Account) -> bool:
        """Count one request against the account's rolling windows; False means 429."""
        now = time.time()
        for window, length in ((acct.hour, self.hour_seconds), (acct.day, self.day_seconds)):
            while window and window[0] <= now - length:
                window.popleft()
        if acct.force_429 > 0:
            acct.force_429 -= 1
            return False
        if len(acct.hour) >= self.hourly_limit or len(acct.day) >= self.daily_limit:
            return False
        acct.hour.append(now)
        acct.day.append(now)
        return True


def make_call(call_id: str | None = None, *, company_id: str = "COM0000000000000000000000000001",
              start_time: datetime | None = None, duration: int = 187, answered: bool = True,
              has_recording: bool = True, agent_email: str = "dana.whitfield@roofing.example",
              customer_name: str = "Maria Delgado", customer_phone_number: str = "+15125550187",
              source_name: str = "GMB Listing", tags: list[str] | None = None,
              direction: str = "inbound") -> dict[str, Any]:
    """A realistic stored call (the sandbox fills in the API ``recording`` URL when served)."""
    cid = call_id or "CAL" + secrets.token_hex(16)
    start = start_time or datetime.now(timezone(timedelta(hours=-5))) - timedelta(hours=1)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    access = secrets.token_hex(10)
    return {
        "id": cid, "answered": answered, "direction": direction, "duration": duration,
        "business_phone_number": "+15125550143", "tracking_phone_number": "+15125550110",
        "customer_city": "Round Rock", "customer_country": "US", "customer_state": "TX",
        "customer_name": customer_name, "customer_phone_number": customer_phone_number,
        "start_time": start.isoformat(timespec="milliseconds"),
        "created_at": start.isoformat(timespec="milliseconds"),
        "voicemail": False, "has_recording": has_recording,
        "recording_duration": str(max(0, duration - 6)) if has_recording else None,
        "recording_player": (f"https://app.callrail.com/calls/{cid}/recording?access_key={access}"
                             if has_recording else None),
        "recording_redirect": (f"https://app.callrail.com/calls/{cid}/recording/redirect"
                               f"?access_key={access}" if has_recording else None),
        "agent_email": agent_email if answered else "", "call_type": "first_call",
        "company_id": company_id, "company_name": "Hill Country Roofing",
        "company_time_zone": "America/Chicago", "source": "Google My Business",
        "source_name": source_name, "tags": list(tags or []), "note": "", "value": "",
        "lead_status": None, "first_call": True, "person_id": "PER" + secrets.token_hex(16),
    }



def _shape(call: dict[str, Any], account_id: str, extra: list[str]) -> dict[str, Any]:
    out = {k: call.get(k) for k in DEFAULT_FIELDS}
    out["recording"] = (f"{request.host_url.rstrip('/')}/v3/a/{account_id}/calls/{call['id']}"
                        "/recording.json" if call.get("has_recording") else None)
    for name in extra:
        if name and name not in out and name in call and name != "has_recording":
            out[name] = call[name]
    return out


def _in_range(start_time: str, start: str | None, end: str | None) -> bool:
    when = datetime.fromisoformat(start_time)
    for bound, is_start in ((start, True), (end, False)):
        if not bound:
            continue
        if "T" in bound:  # a datetime: compare instants (naive bounds read as the call's offset)
            b = datetime.fromisoformat(bound)
            b = b if b.tzinfo else b.replace(tzinfo=when.tzinfo)
            if (when < b) if is_start else (when > b):
                return False
        else:  # a date: inclusive, compared with the call's local date
            d = when.date().isoformat()
            if (d < bound) if is_start else (d > bound):
                return False
    return True


def make_app(state: SandboxState) -> Flask:
    """The sandbox WSGI app over ``state``."""
    app = Flask("callrail_sandbox")

    def err(status: int, message: str) -> Response:
        resp = jsonify({"error": message})
        resp.status_code = status
        return resp

    def gate(account_id: str) -> Account | Response:
        with state.lock:
            state.requests += 1
            acct = state.accounts.get(account_id)
            auth = request.headers.get("Authorization", "")
            if acct is None or auth != f'Token token="{acct.api_key}"':
                return err(401, "HTTP Token: Access denied.")
            acct.requests += 1
            if not state.admit(acct):
                acct.served_429 += 1
                state.served_429 += 1
                acct.log.append((time.time(), 429))
                return err(429, "The User or Agency has sent too many requests.")
            acct.log.append((time.time(), 200))
            return acct

    @app.get("/v3/a/<account_id>/calls.json")
    def calls(account_id: str) -> Response:
        acct = gate(account_id)
        if isinstance(acct, Response):
            return acct
        args = request.args
        extra = [f for f in args.get("fields", "").split(",") if f]
        per_page = max(1, min(int(args.get("per_page", "100")), 250))
        rows = [c for c in acct.calls.values()
                if (not args.get("company_id") or c["company_id"] == args["company_id"])
                and _in_range(c["start_time"], args.get("start_date"), args.get("end_date"))]
        rows.sort(key=lambda c: (datetime.fromisoformat(c["start_time"]), c["id"]), reverse=True)
        if args.get("relative_pagination") == "true":
            after = args.get("after")
            if after:  # cursor: continue strictly after the last call of the previous page
                key = next(((datetime.fromisoformat(c["start_time"]), c["id"])
                            for c in acct.calls.values() if c["id"] == after), None)
                if key is None:
                    return err(400, "invalid cursor")
                rows = [c for c in rows
                        if (datetime.fromisoformat(c["start_time"]), c["id"]) < key]
            page, more = rows[:per_page], len(rows) > per_page
            next_page = None
            if more:
                q = {k: v for k, v in args.items() if k != "after"}
                q["after"] = page[-1]["id"]
                next_page = f"{request.base_url}?{urlencode(q)}"
            return jsonify({"calls": [_shape(c, account_id, extra) for c in page],
                            "has_next_page": more, "next_page": next_page,
                            "per_page": per_page})
        page_no = max(1, int(args.get("page", "1")))
        chunk = rows[(page_no - 1) * per_page: page_no * per_page]
        return jsonify({"page": page_no, "per_page": per_page,
                        "total_pages": (len(rows) + per_page - 1) // per_page,
                        "total_records": len(rows),
                        "calls": [_shape(c, account_id, extra) for c in chunk]})

    @app.get("/v3/a/<account_id>/calls/<call_id>.json")
    def call(account_id: str, call_id: str) -> Response:
        acct = gate(account_id)
        if isinstance(acct, Response):
            return acct
        found = acct.calls.get(call_id)
        if found is None:
            return err(404, "Not found")
        extra = [f for f in request.args.get("fields", "").split(",") if f]
        return jsonify(_shape(found, account_id, extra))

    @app.get("/v3/a/<account_id>/calls/<call_id>/recording.json")
    def recording(account_id: str, call_id: str) -> Response:
        acct = gate(account_id)
        if isinstance(acct, Response):
            return acct
        found = acct.calls.get(call_id)
        if found is None or not found.get("has_recording"):
            return err(404, "Recording not found")
        return jsonify({"url": found["recording_redirect"]})

    @app.post("/_sandbox/accounts/<account_id>")
    def add_account(account_id: str) -> Response:
        body = request.get_json(force=True)
        with state.lock:
            acct = state.accounts.get(account_id)
            if acct is None or body.get("api_key"):
                acct = state.accounts.setdefault(account_id, Account(api_key=body["api_key"]))
                acct.api_key = body.get("api_key") or acct.api_key
            for c in body.get("calls", []):
                acct.calls[c["id"]] = c
            return jsonify({"account_id": account_id, "calls": len(acct.calls)})

    @app.post("/_sandbox/force_429")
    def force_429() -> Response:
        body = request.get_json(force=True)
        with state.lock:
            acct = state.accounts.get(str(body["account_id"]))
            if acct is None:
                return err(404, "unknown account")
            acct.force_429 += int(body.get("count", 1))
            return jsonify({"pending": acct.force_429})

    @app.get("/_sandbox/stats")
    def stats() -> Response:
        # ``?times=1`` adds each account's recent requests as [arrival time, status] pairs.
        times = request.args.get("times") == "1"
        with state.lock:
            return jsonify({
                "requests": state.requests, "served_429": state.served_429,
                "by_account": {k: {"requests": a.requests, "served_429": a.served_429,
                                   "served_ok_window": len(a.hour),
                                   **({"times": list(a.log)} if times else {})}
                               for k, a in state.accounts.items()},
            })

    @app.post("/_sandbox/reset")
    def reset() -> Response:
        with state.lock:
            state.accounts.clear()
            state.requests = state.served_429 = 0
            return jsonify({"reset": True})

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the sandbox with gevent until killed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--hourly-limit", type=int, default=1000)
    p.add_argument("--daily-limit", type=int, default=10000)
    p.add_argument("--hour-seconds", type=float, default=3600.0)
    p.add_argument("--day-seconds", type=float, default=86400.0)
    p.add_argument("--account", action="append", default=[], metavar="ID:API_KEY",
                   help="an account known from the start (no calls yet); repeatable")
    a = p.parse_args(argv)
    from gevent.pywsgi import WSGIServer  # only the served sandbox needs gevent

    state = SandboxState(hourly_limit=a.hourly_limit, daily_limit=a.daily_limit,
                         hour_seconds=a.hour_seconds, day_seconds=a.day_seconds)
    for spec in a.account:
        account_id, sep, api_key = spec.partition(":")
        if not (account_id and sep and api_key):
            p.error(f"--account takes ID:API_KEY, not {spec!r}")
        state.accounts[account_id] = Account(api_key=api_key)
    server = WSGIServer((a.host, a.port), make_app(state), log=None)
    server.start()
    print(f"callrail sandbox listening on http://{a.host}:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
