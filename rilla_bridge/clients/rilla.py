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

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from rilla_bridge.http import http_pool

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
BASE_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json"}


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

    One urllib3 pool per process (``rilla_bridge.http.http_pool``, re-created after
    ``fork``), holding ``pool_maxsize`` connections, more than the Procfile's 200 greenlets a
    worker runs, so that none opens and drops a connection of its own. The pool never
    retries or follows a redirect on its own: retries are the caller's decision.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 3.05,
                 read_timeout: float = 20.0, pool_maxsize: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_maxsize = pool_maxsize
        self._lock = threading.Lock()
        self._pool: urllib3.PoolManager | None = None
        self._pid = 0
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)

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
        """Close this process's pooled connections."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.clear()

    # -- internals ------------------------------------------------------------------

    def pool(self) -> urllib3.PoolManager:
        """The pool for the current process, created on first use (and after fork)."""
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pid != pid:
                # After fork the parent's sockets are shared: drop them without closing.
                self._pool = http_pool(self.base_url, maxsize=self.pool_maxsize)
                self._pid = pid
            return self._pool

    def _send(self, method: str, path: str, api_key: str,
              payload: Mapping[str, Any] | None) -> RillaResult:
        if not isinstance(api_key, str) or not _valid_header_value(api_key):
            return RillaResult("permanent", None, "",
                               error="api key is empty or not a valid header value")
        # Every request names all its headers (a pool's own defaults would be replaced).
        headers = {**BASE_HEADERS, "x-api-key": api_key}
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
            response = self.pool().urlopen(
                method, self.base_url + path, body=data, headers=headers,
                timeout=self._timeout, redirect=False, retries=False)
        except NewConnectionError as exc:   # (a subclass of ConnectTimeoutError)
            return self._failure(method, path, f"connection error ({_cause_name(exc)})")
        except ConnectTimeoutError:
            return self._failure(method, path, f"connect timeout after {self.connect_timeout}s")
        except ReadTimeoutError:
            return self._failure(method, path, f"read timeout after {self.read_timeout}s")
        except (ProtocolError, SSLError, ProxyError) as exc:
            return self._failure(method, path, f"connection error ({_cause_name(exc)})")
        except HTTPError as exc:
            return self._failure(method, path, f"request failed ({type(exc).__name__})")
        # Rilla answers JSON (UTF-8); a byte that is not UTF-8 is replaced, never an error.
        text = response.data[:4 * BODY_LIMIT].decode("utf-8", "replace")   # classify cuts
        result = classify(response.status, text, response.headers.get("Retry-After"))
        log.debug("rilla %s %s -> %s in %.0f ms", method, path, response.status,
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
