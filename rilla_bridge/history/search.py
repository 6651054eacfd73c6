"""The history's search columns: a customer phone in E.164, the name, the rep's email.

The writer fills them from each raw body when it is stored; queries normalise what an
operator types the same way, so ``(512) 555-0100``, ``512.555.0100`` and ``+1 512 555 0100``
all find ``+15125550100``.
"""

from __future__ import annotations

import re
from typing import Any

from rilla_bridge.jsonbody import parse_object
from rilla_bridge.providers import search_fields
from rilla_bridge.tenants import Tenant

_EXTENSION = re.compile(r"(?:ext\.?|x|#|;|,).*$", re.IGNORECASE)
_NOT_DIGIT = re.compile(r"\D")


def e164(raw: Any) -> str | None:
    """A phone number in E.164, best effort: a leading ``+`` (or ``00``) keeps the country
    code as given; 10 digits, or 11 starting with 1, are US/Canada (+1); other digit strings
    of a plausible length get a ``+``; an extension is dropped. None when there are no digits.
    """
    if raw is None or isinstance(raw, bool):
        return None
    text = _EXTENSION.sub("", str(raw)).strip()
    digits = _NOT_DIGIT.sub("", text)
    if not digits:
        return None
    if text.startswith("+"):
        return "+" + digits
    if text.startswith("00") and len(digits) > 4:
        return "+" + digits[2:]
    if len(digits) == 10:
        return "+1" + digits
    if len(digits) == 11 and digits.startswith("1"):
        return "+" + digits
    if 8 <= len(digits) <= 15:
        return "+" + digits
    return digits   # too short or long for E.164: kept as digits, still searchable


def searchable(source: str, kind: str, body: bytes | None, tenant: Tenant | None
               ) -> tuple[str | None, str | None, str | None]:
    """``(customer_phone, customer_name, rep_email)`` for one stored body: the phone in
    E.164, the rep as the tenant maps the call's agent (lower case). Never raises."""
    # Read as intake and the worker read it (a number too long to be real is a missing
    # field there, and must not cost the body its search columns here).
    raw = parse_object(body or b"")
    if isinstance(raw, str):
        return None, None, None
    phone, name, agent = search_fields(source, kind, raw)
    rep = tenant.rep_email(agent) if tenant is not None else agent
    return e164(phone), (name[:200] if name else None), (rep.strip().lower() if rep else None)

