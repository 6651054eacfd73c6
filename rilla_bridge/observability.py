"""Structured logs and Sentry, with secrets and raw bodies kept out of both."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

_SENSITIVE_KEY = re.compile(
    r"(signature|token|api[-_]?key|authorization|secret|password|cookie|access_key|x-api-key|"
    r"signing_key|body|data)", re.IGNORECASE)
# Secrets in URLs: CallRail recording links (access_key=), Callingly webhook URLs (token=), and
# any request line a server quotes in its own error message.
_URL_SECRET = re.compile(r"((?:access_key|token)=)[^&\s\"']+", re.IGNORECASE)
# Callingly recording links are bearer links: their path is the secret (cdn.callingly.com).
_CALLINGLY_LINK = re.compile(r"(https?:\\?/\\?/[a-z0-9.-]*callingly\.com)[^\s\"'<>]*",
                             re.IGNORECASE)
FILTERED = "[Filtered]"


_encode = json.JSONEncoder(default=str).encode   # one encoder, not one per line
_RAW = (bytes, bytearray, memoryview)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra=`` fields."""

    _skip = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
    _second: tuple[int, str] = (-1, "")

    def _stamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:  # strftime once a second, not once a line
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._skip and not k.startswith("_"):
                out[k] = FILTERED if isinstance(v, _RAW) else v   # raw bytes: a body
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact_text(_encode(out))


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(getattr(h, "_rilla_bridge", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._rilla_bridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


_known_secrets: list[str] = []
_SHORTEST_MARK = len("token=")   # of what marks a secret in a URL (below)


def register_secrets(values: Iterable[str]) -> None:
    """Secrets (tenant keys, tokens) that must be masked wherever they would be printed."""
    for v in values:
        if v and v not in _known_secrets:
            _known_secrets.append(v)
    _known_secrets.sort(key=len, reverse=True)


def redact_text(text: str) -> str:
    # Most text printed (a console page's thousands of values) is shorter than every secret
    # (sorted longest first): then the loop over them is skipped.
    if _known_secrets and len(text) >= len(_known_secrets[-1]):
        for s in _known_secrets:
            if s in text:
                text = text.replace(s, FILTERED)
    if len(text) < _SHORTEST_MARK:
        return text
    folded = text.casefold()
    if "callingly.com" in folded:
        text = _CALLINGLY_LINK.sub(r"\1/" + FILTERED, text)
    if "access_key" not in folded and "token=" not in folded:   # the regex costs ten times this
        return text
    return _URL_SECRET.sub(r"\1" + FILTERED, text)


def scrub(value: Any, key: str = "") -> Any:
    """Deep copy of ``value`` with sensitive keys and known secrets replaced."""
    if key and _SENSITIVE_KEY.search(key):
        return FILTERED
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _RAW):
        # Raw bytes are bodies (a webhook's, an API's answer): never sent, whatever the key.
        return FILTERED
    return value


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    # Sentry has already turned bytes into text here; the log record still has them: an
    # ``extra=`` field holding raw bytes is a body, whatever its name.
    record = hint.get("log_record")
    extra = event.get("extra")
    if isinstance(record, logging.LogRecord) and isinstance(extra, dict):
        for k, v in vars(record).items():
            if isinstance(v, _RAW) and k in extra:
                extra[k] = FILTERED
    request = event.get("request")
    if isinstance(request, dict):
        # Raw webhook bodies and query strings (Callingly's token) never leave the process.
        request.pop("data", None)
        request.pop("query_string", None)
        request.pop("cookies", None)
        if "url" in request:
            request["url"] = str(request["url"]).split("?", 1)[0]
    scrubbed: dict[str, Any] = scrub(event)
    return scrubbed


def init_sentry(dsn: str, *, environment: str, component: str, **extra: Any) -> bool:
    """Start Sentry when a DSN is set; returns whether it was started."""
    if not dsn:
        return False
    import sentry_sdk

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        # PII stays off by default; passing send_default_pii at all is deprecated (sentry-sdk 2.x)
        max_request_body_size="never",
        include_local_variables=False,
        # No sentry-trace / baggage headers on requests to Rilla or CallRail: they carry the
        # DSN's public key and our release to third parties.
        trace_propagation_targets=[],
        before_send=_before_send,  # type: ignore[arg-type]
        **extra,
    )
    # On the global scope: a worker builds its runtime inside its first task, whose own
    # (context-local) scope the other tasks' events would not carry.
    sentry_sdk.get_global_scope().set_tag("component", component)
    return True
