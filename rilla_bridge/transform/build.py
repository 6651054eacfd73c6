"""Merged call fields -> the one thing to do in Rilla (upsert, delete, skip, resolve first)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError, validate

from rilla_bridge.providers import PROVIDERS, callrail
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform.appointment import MAX_CUSTOM_FIELD_CHARS, validate_appointment
from rilla_bridge.transform.fields import add_seconds
from rilla_bridge.transform.model import (
    Delete,
    NeedsRecording,
    Skip,
    TransformError,
    Upsert,
    event_id_for,
)

Action = Upsert | Delete | Skip | NeedsRecording

_EMAIL = validate.Email()
# Host names that never name a public server: a recording there is someone's internal host.
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa", ".intranet")


def _text(merged: Mapping[str, Any], key: str) -> str | None:
    value = merged.get(key)
    return value.strip() or None if isinstance(value, str) else None


def _count(merged: Mapping[str, Any], key: str) -> int | None:
    value = merged.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def build_action(source: str, call_id: str, merged: dict[str, Any], tenant: Tenant,
                 resolved_recordings: Mapping[str, str]) -> Action:
    """Decide what Rilla should get for one call, from its merged fields.

    Order matters: spam deletes whatever else is known; an unrecorded call is skipped before
    its data is judged (unanswered calls have no agent and are not errors); the payload is
    checked before a recording lookup spends CallRail quota.
    """
    provider = PROVIDERS.get(source)
    if provider is None:
        raise TransformError(f"unknown source {source!r}")
    label: str = provider.LABEL
    event_id = event_id_for(source, call_id)
    if source == "callrail" and merged.get("spam") is True:
        return Delete(event_id)
    recording = _text(merged, "recording")
    if recording is None and not tenant.deliver_unrecorded:
        return Skip(f"no recording: {label} call {call_id} has no recording "
                    f"and tenant {tenant.slug} does not deliver unrecorded calls")

    notes: list[str] = []
    payload = _payload(source, label, event_id, merged, tenant, notes)
    if recording is not None:
        api = callrail.recording_api_call(recording) if source == callrail.NAME else None
        if api is not None:
            _own_call(api, call_id, tenant)
            if recording not in resolved_recordings:
                return NeedsRecording(api_url=recording, account_id=api[0], call_id=api[1])
            recording = resolved_recordings[recording]
        refusal = recording_refusal(recording, tenant)
        if refusal:
            raise TransformError(refusal)
        payload["media_url"] = recording
        payload["recording_type"] = "CALL_AUDIO"
    validate_appointment(payload)
    return Upsert(payload, tuple(notes))


def _own_call(api: tuple[str, str], call_id: str, tenant: Tenant) -> None:
    """A recording.json URL is resolved only for the event's own call in the tenant's own
    account: anything else would fetch another tenant's recording (and spend its quota)."""
    account, api_call = api
    own = tenant.callrail.account_id if tenant.callrail else None
    if api_call != call_id or (own and account != own):
        raise TransformError(
            f"recording URL names CallRail call {api_call[:40]!r} in account {account[:20]!r}; "
            f"only this call ({call_id}) in the tenant's own account ({own or 'none'}) is "
            "looked up")


def recording_refusal(url: str, tenant: Tenant) -> str | None:
    """Why ``url`` may not be sent to Rilla as a recording (None: it may). Only https URLs on
    public hosts, besides the hosts the tenant lists in ``recording_hosts``."""
    try:
        parts = urlsplit(url.strip())
        # "localhost." and "169.254.169.254." are the same hosts as without the final dot.
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return "recording URL is not a URL"
    if host in tenant.recording_hosts:
        return None if parts.scheme in ("http", "https") else "recording URL is not http(s)"
    why = ""
    if parts.scheme != "https":
        why = f"is {parts.scheme or 'not'} http(s), not https"
    elif not host:
        why = "has no host"
    else:
        address = _ip_literal(host)
        if address is None:
            if host == "localhost" or host.endswith(_PRIVATE_SUFFIXES) or "." not in host:
                why = f"names the internal host {host!r}"
        elif not address.is_global:
            why = f"names the non-public address {host}"
    if not why:
        return None
    return (f"recording URL {why}: only https URLs on public hosts are sent to Rilla (add the "
            "host to the tenant's recording_hosts if it is right)")


_INET_ATON_CHARS = frozenset("0123456789abcdefx.")


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address when it is one, including the older IPv4 spellings that
    HTTP clients still resolve (``127.1``, ``0x7f.1``, ``0177.0.0.1``, ``2130706433``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not set(host) <= _INET_ATON_CHARS:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _payload(source: str, label: str, event_id: str, merged: Mapping[str, Any],
             tenant: Tenant, notes: list[str]) -> dict[str, Any]:
    agent = _text(merged, "agent_email")
    user_email = tenant.rep_email(agent)
    if user_email and not _valid_email(user_email):
        if not tenant.default_user_email:
            raise TransformError(f"no rep email: agent_email {user_email[:80]!r} is not an "
                                 f"email address and tenant {tenant.slug} has no "
                                 "default_user_email")
        notes.append(f"agent_email {user_email[:80]!r} is not an email address: the call goes "
                     "to the tenant's default_user_email")
        user_email = tenant.default_user_email
    if not user_email:
        raise TransformError(f"no rep email: the call has no agent_email and tenant "
                             f"{tenant.slug} has no default_user_email")
    start, end = _times(source, merged, notes)
    customer = _customer(source, label, merged)
    direction = _text(merged, "direction")
    who = customer["name"]
    title = f"{direction.capitalize()} call with {who}" if direction else f"Call with {who}"
    payload: dict[str, Any] = {
        "event_id": event_id,
        "user_email": user_email,
        "start_time": start,
        "end_time": end,
        "title": title,
        "customer": customer,
    }
    lead_source = (_text(merged, "source_name") or _text(merged, "source")
                   if source == "callrail" else _text(merged, "lead_source"))
    if lead_source:
        payload["lead_source"] = lead_source
    custom = _custom_fields(source, merged, notes)
    if custom:
        payload["custom_fields"] = custom
    return payload


def _times(source: str, merged: Mapping[str, Any], notes: list[str]) -> tuple[str, str]:
    start = _text(merged, "start_time")
    key = "start_time" if source == "callrail" else "datetime"
    if start is None:
        bad = _text(merged, "start_time_invalid")
        if bad is not None:
            raise TransformError(
                f"no usable start time: {key} {bad!r} is not ISO 8601 with an offset")
        raise TransformError(f"no usable start time: the call has no {key}")
    bad_duration = _text(merged, "duration_invalid")
    if _count(merged, "duration") is None and bad_duration is not None:
        notes.append(f"duration {bad_duration} is not a number of seconds (0 to a day): the "
                     "end time is the start time")
    end = add_seconds(start, _count(merged, "duration") or 0)
    if end is None:
        raise TransformError(f"no usable end time: start {start!r} plus duration "
                             f"{merged.get('duration')!r} seconds is out of range")
    return start, end


def _customer(source: str, label: str, merged: Mapping[str, Any]) -> dict[str, str]:
    phone = _text(merged, "customer_phone")
    email = _text(merged, "customer_email")
    if source == "callrail":
        customer_id = _text(merged, "customer_id") or phone
        if customer_id is None:
            raise TransformError("no customer id: the call has neither person_resource_id "
                                 "nor customer_phone_number")
    else:
        customer_id = _text(merged, "customer_id")
        if customer_id is None:
            raise TransformError("no customer id: the Callingly call has no lead id")
    name = _text(merged, "customer_name") or phone or email
    if name is None:
        raise TransformError(f"no customer name: the {label} call has no caller name, "
                             "phone number or email")
    customer = {"id": customer_id, "name": name}
    if email and _valid_email(email):
        # A malformed lead email is not worth losing the recording over; it is dropped.
        customer["email"] = email
    if phone:
        customer["phone"] = phone
    address = ", ".join(p for p in (_text(merged, "customer_city"),
                                    _text(merged, "customer_state")) if p)
    if address:
        customer["address"] = address
    return customer


def _valid_email(value: str) -> bool:
    try:
        _EMAIL(value)
    except ValidationError:
        return False
    return True


def _custom_fields(source: str, merged: Mapping[str, Any], notes: list[str]
                   ) -> dict[str, Any]:
    keys: tuple[str, ...] = PROVIDERS[source].CUSTOM_FIELDS
    out: dict[str, Any] = {}
    for key in keys:
        value = merged.get(key)
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value if v not in (None, ""))
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "" or isinstance(value, dict):
            continue
        if isinstance(value, str) and len(value) > MAX_CUSTOM_FIELD_CHARS:
            # An optional field is not worth a recorded call: it is shortened, not refused.
            notes.append(f"custom field {key!r} shortened from {len(value)} characters to "
                         f"{MAX_CUSTOM_FIELD_CHARS}")
            value = value[:MAX_CUSTOM_FIELD_CHARS - 1] + "…"
        out[key] = value
    return out
