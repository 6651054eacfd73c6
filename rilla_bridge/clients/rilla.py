"""HTTP client for Rilla's Custom CRM API.

``classify`` is the one place Rilla's status codes are sorted into delivery outcomes
(SPEC "Delivery outcomes"): 2xx delivered, 400/404/422 (and other 4xx) permanent,
408/425/429/5xx, timeouts and connection errors retryable.

The API key travels only in the ``x-api-key`` header. It never appears in a
``RillaResult``, an exception message, a repr or a log line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib import metadata
from typing import Any, Literal, Protocol
from urllib.parse import quote

import requests

from rilla_bridge.http import http_session

log = logging.getLogger(__name__)

BODY_LIMIT = 2000
RETRYABLE_4XX = frozenset({408, 425, 429})
APPOINTMENT_PATH = "/custom/appointment"

Kind = Literal["ok", "permanent", "retryable"]


def _version() -> str:
    try:
        return metadata.version("rilla-bridge")
    except metadata.PackageNotFoundError:
        return "0.1.0"


USER_AGENT = f"rilla-bridge/{_version()}"


@dataclass(frozen=True)
class RillaResult:
    """Outcome of one call to Rilla.

    ``status`` is None when no HTTP response arrived (timeout, connection error, or a
    request we refused to send); ``error`` then says why, without secrets or URLs.
    """

    kind: Kind
    status: int | None
    body: str
    retry_after: float | None = None
    error: str | None = None


class RillaAPI(Protocol):
    """What the pipeline needs of Rilla: ``RillaClient``, or a test's fake of it (one test
    runs the client's contract against both the fake and the sandbox)."""

    def upsert(self, api_key: str, payload: Mapping[str, Any]) -> RillaResult: ...

    def delete(self, api_key: str, event_id: str) -> RillaResult: ...


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def classify(status: int, body: str, retry_after_header: str | None) -> RillaResult:
    """Sort an HTTP response from Rilla into ok / permanent / retryable.

    2xx is ok. 4xx is permanent except 408, 425 and 429, which are retryable like 5xx.
    Anything else (1xx, 3xx, out-of-range codes) is unexpected from Rilla and is
    treated as retryable, so that it ends in the dead-letter store only once retries
    are exhausted rather than at once. Retry-After is honoured on every retryable answer.
    """
    text = body[:BODY_LIMIT]
    if 200 <= status < 300:
        return RillaResult("ok", status, text)
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return RillaResult("permanent", status, text)
    return RillaResult("retryable", status, text, parse_retry_after(retry_after_header))


def _valid_header_value(value: str) -> bool:
    return bool(value) and value.isprintable() and value == value.strip() and value.isascii()


class RillaClient:
    """Thread- and greenlet-safe client for the Custom CRM API.

    One ``requests.Session`` per process (re-created after ``fork``), whose connection
    pool holds ``pool_maxsize`` connections, more than the Procfile's 200 greenlets a worker
    runs, so that none opens and drops a connection of its own.
    The adapter never retries on its own: retries are the caller's decision.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 3.05,
                 read_timeout: float = 20.0, pool_maxsize: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_maxsize = pool_maxsize
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._pid = 0

    def __repr__(self) -> str:
        return f"RillaClient(base_url={self.base_url!r})"

    def __enter__(self) -> RillaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------

    def upsert(self, api_key: str, payload: Mapping[str, Any]) -> RillaResult:
        """Create or update an appointment (POST /custom/appointment)."""
        return self._send("POST", APPOINTMENT_PATH, api_key, payload)

    def delete(self, api_key: str, event_id: str) -> RillaResult:
        """Delete an appointment; an unknown event (404) already counts as deleted."""
        if not event_id:
            return RillaResult("permanent", None, "", error="empty event_id")
        path = f"{APPOINTMENT_PATH}/{quote(event_id, safe='')}"
        result = self._send("DELETE", path, api_key, None)
        if result.status == 404:
            return RillaResult("ok", 404, result.body)
        return result

    def close(self) -> None:
        """Close this process's session and its pooled connections."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None and self._pid == os.getpid():
            session.close()

    # -- internals ------------------------------------------------------------------

    def session(self) -> requests.Session:
        """The session for the current process, created on first use (and after fork)."""
        pid = os.getpid()
        session = self._session
        if session is not None and self._pid == pid:
            return session
        with self._lock:
            if self._session is None or self._pid != pid:
                # After fork the parent's sockets are shared: drop them without closing.
                self._session = self._new_session()
                self._pid = pid
            return self._session

    def _new_session(self) -> requests.Session:
        session = http_session(self.base_url, pool_maxsize=self.pool_maxsize)
        session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        return session

    def _send(self, method: str, path: str, api_key: str,
              payload: Mapping[str, Any] | None) -> RillaResult:
        if not isinstance(api_key, str) or not _valid_header_value(api_key):
            return RillaResult("permanent", None, "",
                               error="api key is empty or not a valid header value")
        headers = {"x-api-key": api_key}
        data: bytes | None = None
        if payload is not None:
            try:
                data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                return RillaResult("permanent", None, "",
                                   error=f"payload is not JSON serializable: {exc}")
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        try:
            response = self.session().request(
                method, self.base_url + path, data=data, headers=headers,
                timeout=(self.connect_timeout, self.read_timeout), allow_redirects=False)
        except requests.exceptions.ConnectTimeout:
            return self._failure(method, path, f"connect timeout after {self.connect_timeout}s")
        except requests.exceptions.ReadTimeout:
            return self._failure(method, path, f"read timeout after {self.read_timeout}s")
        except requests.exceptions.ConnectionError as exc:
            return self._failure(method, path, f"connection error ({_cause_name(exc)})")
        except requests.exceptions.RequestException as exc:
            return self._failure(method, path, f"request failed ({type(exc).__name__})")
        try:
            text = response.text[:BODY_LIMIT]
        finally:
            response.close()
        result = classify(response.status_code, text, response.headers.get("Retry-After"))
        log.debug("rilla %s %s -> %s in %.0f ms", method, path, response.status_code,
                  (time.monotonic() - started) * 1000)
        return result

    @staticmethod
    def _failure(method: str, path: str, message: str) -> RillaResult:
        error = f"{message}: {method} {path}"
        log.debug("rilla %s", error)
        return RillaResult("retryable", None, "", error=error)


def _cause_name(exc: BaseException) -> str:
    """Name of the innermost cause of a connection error (e.g. ConnectionRefusedError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    name = type(exc).__name__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        reason = getattr(current, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None and current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        current = nxt or current.__cause__ or current.__context__
    return name
