"""Reading a webhook body as JSON, the same way at intake and in the worker.

Strict where a sender is broken (not UTF-8, not JSON, ``NaN``/``Infinity``, which JSON does not
have), lenient where one odd value should not cost a call: a leading byte-order mark is
accepted, and a number too long to be real (a 5,000-digit integer) becomes a missing field
instead of a bad body.
"""

from __future__ import annotations

import json
from typing import Any

MAX_INT_DIGITS = 40   # more than any id or count a call tracker sends


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int | None:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else None


def _parse_float(text: str) -> float | None:
    value = float(text)
    return value if value not in (float("inf"), float("-inf")) else None


def parse_object(body: bytes) -> dict[str, Any] | str:
    """The body as a JSON object, or why it is not one (a message for a 400)."""
    if not body:
        return "empty body: expected a JSON object"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "body is not valid UTF-8"
    try:
        parsed = json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int,
                            parse_float=_parse_float)
    except (ValueError, RecursionError):
        return "body is not valid JSON"
    if not isinstance(parsed, dict):
        return "body must be a JSON object"
    return parsed
