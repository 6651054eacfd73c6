"""Lenient marshmallow fields for the quirks of real webhook bodies, and time helpers.

Optional fields never fail a load: a value of the wrong shape becomes ``None`` (missing), because
one odd optional attribute must not dead-letter a call whose recording is fine. Only the call id
is strict (see ``CallId``); everything a payload truly needs is checked later, by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from marshmallow import ValidationError, fields

RILLA_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
JsonScalar = str | int | float | bool | None

_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
# Ids end up in a URL path (DELETE /custom/appointment/{event_id}), so keep them path-safe.
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_INT_STR_RE = re.compile(r"^[+-]?\d+(\.0*)?$")


def clean_text(value: Any) -> str | None:
    """A trimmed string, or None for missing, empty or non-scalar values (numbers become text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, str):
        return value.strip() or None
    return None


def clean_bool(value: Any) -> bool | None:
    """JSON booleans, ``"true"``/``"false"``/``"1"``/``"0"`` and 0/1; anything else is missing."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def clean_int(value: Any) -> int | None:
    """Non-negative whole numbers given as int, integral float or digit string (``"247"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and _INT_STR_RE.match(value.strip()):
        value = int(float(value.strip())) if "." in value else int(value.strip())
    if isinstance(value, int) and value >= 0:
        return value
    return None


MAX_CALL_SECONDS = 86400
_DECIMAL_RE = re.compile(r"^\d+(\.\d+)?$")


def clean_seconds(value: Any) -> int | str | None:
    """A call's length in whole seconds: counts given as int, float or text are rounded
    (``95.5`` -> 96); missing or empty is None; anything else (``"1e9"``, ``"-5"``, over a
    day) comes back as its text, so the call can be delivered and the bad value named."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _DECIMAL_RE.match(value.strip()):
        number = float(value.strip())
    if number is not None and math.isfinite(number) and 0 <= number <= MAX_CALL_SECONDS:
        return int(number + 0.5)
    return preview(value, 40)


def clean_scalar(value: Any) -> JsonScalar:
    """A plain JSON scalar kept as given (strings trimmed); containers and NaN are missing."""
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return clean_text(value)


def clean_tags(value: Any) -> list[str] | None:
    """Tag names from strings or ``{id, name}`` objects, in order, without duplicates."""
    items: list[Any]
    if isinstance(value, list):
        items = value
    elif isinstance(value, (str, Mapping)):
        items = [value]
    else:
        return None
    out: list[str] = []
    for item in items:
        name = clean_text(item.get("name")) if isinstance(item, Mapping) else clean_text(item)
        if name and name not in out:
            out.append(name)
    return out or None


def clean_id(value: Any) -> str | None:
    """An id as a path-safe string (numeric legacy ids become text); None when unusable."""
    text = clean_text(value)
    if text is None or not _ID_RE.match(text):
        return None
    return text


def raw_call_id(value: Any) -> str | None:
    """A provider's call id as text for our records (intake's own, before any schema)."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    if isinstance(value, int | str):
        # JSON may escape lone surrogates ("\ud800"): valid JSON, but not UTF-8 for Redis.
        return str(value)[:100].encode("utf-8", "replace").decode("utf-8")
    return None


def to_utc(value: str) -> str | None:
    """An ISO 8601 time *with an offset* as Rilla's UTC ``YYYY-MM-DD HH:MM:SS``, else None.

    The offset in the value wins over any company time zone: CallRail's offsets need not match
    ``company_time_zone``. A time without an offset is refused rather than guessed.
    """
    text = value.strip()
    if not re.match(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", text):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            return None
        return parsed.astimezone(UTC).strftime(RILLA_TIME_FORMAT)
    except (ValueError, OverflowError):
        return None


def naive_utc(value: str) -> str | None:
    """CallRail's legacy ``datetime`` (UTC, no offset: ``2018-02-19 18:41:00``), Rilla format."""
    try:
        parsed = datetime.strptime(value.strip(), RILLA_TIME_FORMAT)
    except ValueError:
        return None
    return parsed.strftime(RILLA_TIME_FORMAT)


def add_seconds(start: str, seconds: int) -> str | None:
    """``start`` (Rilla format) plus ``seconds``; None when it leaves the calendar's range."""
    try:
        end = datetime.strptime(start, RILLA_TIME_FORMAT) + timedelta(seconds=seconds)
    except (ValueError, OverflowError):
        return None
    return end.strftime(RILLA_TIME_FORMAT)


class Text(fields.Field[str | None]):
    """Free text; ``""`` and whitespace mean missing; numbers are kept as their text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(load_default=None, allow_none=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None,
                     data: Mapping[str, Any] | None, **kwargs: Any) -> str | None:
        return clean_text(value)


class Bool(Text):
    """A boolean that may arrive as ``"true"``/``"false"``/``"1"``/``"0"``."""

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> bool | None:
        return clean_bool(value)


class Int(Text):
    """A non-negative count that may arrive as a digit string (``"247"``)."""

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> int | None:
        return clean_int(value)


class Seconds(Text):
    """A call's length: whole seconds, or the unusable value's text (see ``clean_seconds``)."""

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> int | str | None:
        return clean_seconds(value)


def seconds_field(value: int | str | None) -> tuple[int | None, str | None]:
    """(seconds, the bad value's text) from what a ``Seconds`` field loaded."""
    return (None, value) if isinstance(value, str) else (value, None)


class Scalar(Text):
    """Any plain JSON scalar, kept as given (money ``value`` may be a number or text)."""

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> JsonScalar:
        return clean_scalar(value)


class Tags(Text):
    """Tag names from a list of strings or of ``{id, name}`` objects."""

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> list[str] | None:
        return clean_tags(value)


class LooseId(Text):
    """An id that is allowed to be absent or unusable (a fallback decides later)."""

    def _deserialize(self, value: Any, attr: str | None,
                     data: Mapping[str, Any] | None, **kwargs: Any) -> str | None:
        return clean_id(value)


class Object(Text):
    """A nested object loaded with ``schema``; anything but an object is missing."""

    def __init__(self, schema: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema = schema

    def _deserialize(self, value: Any, attr: str | None,  # type: ignore[override]
                     data: Mapping[str, Any] | None, **kwargs: Any) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            return None
        try:
            loaded: dict[str, Any] = self.schema.load(value)
        except ValidationError:
            return None
        return loaded




def preview(value: Any, limit: int = 60) -> str:
    """A short repr of a bad value for an error message (bodies can be huge)."""
    text = "missing" if value is None else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def validation_text(exc: ValidationError) -> str:
    """marshmallow's nested error messages as one readable line (``customer.id: ...``)."""
    return "; ".join(_flatten(exc.messages, ""))


def _flatten(messages: Any, prefix: str) -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            name = prefix if key == "_schema" else f"{prefix}{key}"
            out += _flatten(value, f"{name}." if name else "")
        return out
    text = "; ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
    label = prefix.rstrip(".")
    return [f"{label}: {text}" if label else text]
