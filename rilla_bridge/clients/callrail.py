"""CallRail API v3 client: one method, one HTTP request, one classified result.

Every method makes exactly one request because the caller has spent exactly one quota token
(``QuotaGuard.take``) on it; retries of 5xx and timeouts go back through the guard instead of
looping here, so no request ever bypasses the budget.

``base_url`` is ``CALLRAIL_BASE_URL`` (``https://api.callrail.com``; a trailing ``/v3`` is
accepted). The API key travels only in the ``Authorization`` header, only to ``base_url``'s host,
and never appears in a result's ``error``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import requests

from rilla_bridge.http import http_session

ResultKind = Literal["ok", "rate_limited", "retryable", "permanent"]

_sessions: dict[tuple[int, str], requests.Session] = {}


@dataclass(frozen=True)
class CallRailResult:
    """Outcome of one request. ``error`` is safe to log: it never holds the API key."""

    kind: ResultKind
    status: int | None
    data: dict[str, Any] | None
    error: str | None


def classify(status: int) -> ResultKind:
    """The one place that maps an HTTP status to what the caller should do."""
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "retryable"
    return "permanent"


def _session(base_url: str) -> requests.Session:
    # A Session is not safe to share across fork(): each process gets its own pool.
    pid = os.getpid()
    session = _sessions.get((pid, base_url))
    if session is None:
        if any(p != pid for p, _ in _sessions):
            _sessions.clear()
        session = _sessions[(pid, base_url)] = http_session(base_url)
    return session


class CallRailClient:
    """Thin CallRail API v3 client; see the module docstring for the one-request rule."""

    def __init__(self, base_url: str, *, connect_timeout: float = 3.05,
                 read_timeout: float = 20.0) -> None:
        base = base_url.rstrip("/")
        base = base.removesuffix("/v3")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("CallRail base URL must be http(s)://host")
        self.base_url = base
        self._origin = (parts.scheme, parts.netloc.lower())
        self.timeout = (connect_timeout, read_timeout)

    # -- endpoints -------------------------------------------------------------
    def get_recording(self, api_key: str, account_id: str, call_id: str) -> CallRailResult:
        """``GET /v3/a/{account}/calls/{id}/recording.json``; data ``{"url": ...}``."""
        return self._get(api_key, self._path(account_id, "calls", call_id, "recording.json"))

    def get_call(self, api_key: str, account_id: str, call_id: str,
                 fields: Sequence[str] = ()) -> CallRailResult:
        """``GET /v3/a/{account}/calls/{id}.json`` with ``fields=`` added to the default set."""
        params = {"fields": ",".join(fields)} if fields else {}
        return self._get(api_key, self._path(account_id, "calls", f"{call_id}.json"), params)

    def list_calls(self, api_key: str, account_id: str, *, company_id: str | None,
                   start_date: str, end_date: str, fields: Sequence[str], per_page: int = 250,
                   page_url: str | None = None) -> CallRailResult:
        """One page of calls (relative pagination); data has calls, has_next_page, next_page.

        Pass the previous page's ``next_page`` as ``page_url`` to continue; it is used unchanged
        but refused (permanent, no request) unless it points at ``base_url``'s scheme and host.
        """
        if page_url is not None:
            parts = urlsplit(page_url)
            if (parts.scheme, parts.netloc.lower()) != self._origin:
                return CallRailResult("permanent", None, None,
                                      "next_page URL points outside the CallRail base URL")
            return self._get(api_key, page_url, absolute=True)
        params: dict[str, Any] = {"start_date": start_date, "end_date": end_date,
                                  "relative_pagination": "true",
                                  "per_page": max(1, min(per_page, 250))}
        if company_id:
            params["company_id"] = company_id
        if fields:
            params["fields"] = ",".join(fields)
        return self._get(api_key, self._path(account_id, "calls.json"), params)

    def count_calls(self, api_key: str, account_id: str, *, company_id: str | None,
                    start_date: str, end_date: str) -> CallRailResult:
        """Total calls in a date range (offset pagination, one record): data total_records."""
        params: dict[str, Any] = {"start_date": start_date, "end_date": end_date, "per_page": 1}
        if company_id:
            params["company_id"] = company_id
        result = self._get(api_key, self._path(account_id, "calls.json"), params)
        if result.kind != "ok" or result.data is None:
            return result
        total = result.data.get("total_records")
        if not isinstance(total, int):
            return CallRailResult("permanent", result.status, None,
                                  "calls.json response has no total_records")
        return CallRailResult("ok", result.status, {"total_records": total}, None)

    # -- plumbing --------------------------------------------------------------
    def _path(self, account_id: str, *parts: str) -> str:
        return "/v3/a/" + "/".join(quote(str(p), safe=".") for p in (account_id, *parts))

    def _get(self, api_key: str, path_or_url: str, params: Mapping[str, Any] | None = None,
             *, absolute: bool = False) -> CallRailResult:
        url = path_or_url if absolute else self.base_url + path_or_url
        if params:
            url += "?" + urlencode(params, safe=",")
        headers = {"Authorization": f'Token token="{api_key}"',
                   "Request-From": "rilla-bridge", "Accept": "application/json"}
        where = urlsplit(url).path  # error text names the path, never the headers
        try:
            # No redirects: requests would follow one to another host; CallRail API never
            # redirects, so a 3xx is a misconfiguration and is reported as permanent.
            resp = _session(self.base_url).get(url, headers=headers, timeout=self.timeout,
                                  allow_redirects=False)
        except requests.Timeout:
            return CallRailResult("retryable", None, None, f"timeout on GET {where}")
        except requests.ConnectionError as exc:
            return CallRailResult("retryable", None, None,
                                  f"connection error on GET {where}: {type(exc).__name__}")
        except requests.RequestException as exc:
            return CallRailResult("permanent", None, None,
                                  f"request error on GET {where}: {type(exc).__name__}")
        kind = classify(resp.status_code)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if kind == "ok":
            if not isinstance(body, dict):
                # A 2xx without a JSON object is a proxy or outage page, not CallRail's answer.
                return CallRailResult("retryable", resp.status_code, None,
                                      f"GET {where}: 2xx without a JSON object")
            return CallRailResult("ok", resp.status_code, body, None)
        detail = ""
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            detail = ": " + body["error"][:200]
        return CallRailResult(kind, resp.status_code, None,
                              f"GET {where} -> {resp.status_code}{detail}")
