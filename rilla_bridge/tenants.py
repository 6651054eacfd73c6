"""The tenants file: one TOML table per client business.

``${NAME}`` in any string is replaced by that environment variable; a missing variable, an
unknown key, a bad slug, a missing or short secret is one ``ConfigError`` naming the tenant
and key. A CallRail signing key or a Callingly token may be a list of two during a rotation:
either verifies.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rilla_bridge.settings import ConfigError

SLUG_RE = re.compile(r"^[a-z0-9-]+$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


MIN_SECRET_CHARS = 16   # shorter ones can be guessed (a 2-character token fell in 192 tries)


@dataclass(frozen=True)
class CallRailConfig:
    signing_keys: tuple[str, ...]   # one, or two while the company's key is rotated
    account_id: str | None = None
    company_id: str | None = None
    api_key: str | None = None

    @property
    def api_enabled(self) -> bool:
        return bool(self.account_id and self.api_key)


@dataclass(frozen=True)
class CallinglyConfig:
    webhook_tokens: tuple[str, ...]  # one, or two while the token is rotated


@dataclass(frozen=True)
class Tenant:
    slug: str
    rilla_api_key: str
    default_user_email: str | None = None
    deliver_unrecorded: bool = False
    # source agent email (lower case) -> Rilla rep email
    users: Mapping[str, str] = field(default_factory=dict)
    callrail: CallRailConfig | None = None
    callingly: CallinglyConfig | None = None
    # Fair delivery (rilla_bridge/lanes.py): a tenant of weight 2 gets twice the turns of a
    # tenant of weight 1 when both have work waiting; max_inflight overrides
    # TENANT_MAX_INFLIGHT for this tenant.
    weight: float = 1.0
    max_inflight: int | None = None
    # Intake limit (events per second, body MiB per minute); None: the settings' defaults.
    intake_per_second: float | None = None
    intake_mib_per_minute: float | None = None
    # Hosts (besides public https hosts) a recording URL may point at, e.g. an internal CDN.
    recording_hosts: tuple[str, ...] = ()

    def rep_email(self, agent_email: str | None) -> str | None:
        """The Rilla rep for a call: mapped agent email, the agent email, else the default."""
        if agent_email:
            return self.users.get(agent_email.strip().lower(), agent_email.strip())
        return self.default_user_email

    def secrets(self) -> list[str]:
        out = [self.rilla_api_key]
        if self.callrail:
            out += [*self.callrail.signing_keys, self.callrail.api_key or ""]
        if self.callingly:
            out += list(self.callingly.webhook_tokens)
        return [s for s in out if s]


_TENANT_KEYS = {
    "rilla_api_key", "default_user_email", "deliver_unrecorded", "users", "callrail", "callingly",
    "weight", "max_inflight", "intake_per_second", "intake_mib_per_minute", "recording_hosts",
}
_CALLRAIL_KEYS = {"signing_key", "account_id", "company_id", "api_key"}
_CALLINGLY_KEYS = {"webhook_token"}


def _interpolate(value: Any, where: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return env[name]

        return _VAR_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, where, env) for v in value]
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        allowed_text = ", ".join(sorted(allowed))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {allowed_text})")


def _required_str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} is required and must be a non-empty string")
    return value.strip()


def _secret(value: str, name: str, where: str) -> str:
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"{where}: {name} is {len(value)} characters; secrets need at least "
                          f"{MIN_SECRET_CHARS} (generate one: openssl rand -hex 24)")
    return value


def _secrets(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """A secret, or a list of two during a rotation (either verifies)."""
    value = table.get(key)
    raw = value if isinstance(value, list) else [value]
    values = [v.strip() for v in raw if isinstance(v, str) and v.strip()]
    if not 1 <= len(raw) <= 2 or len(values) != len(raw):
        raise ConfigError(f"{where}: {key} is required: a non-empty string, or a list of two "
                          "while it is being rotated")
    return tuple(_secret(v, key, where) for v in values)


def _positive(raw: Mapping[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a number above 0")
    return float(value)


def _optional_str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value.strip() or None


def _tenant(slug: str, raw: Any, env: Mapping[str, str]) -> Tenant:
    where = f"tenant {slug!r}"
    if not SLUG_RE.match(slug):
        raise ConfigError(f"{where}: slug must match [a-z0-9-]+")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(raw, _TENANT_KEYS, where)
    raw = _interpolate(raw, where, env)
    users_raw = raw.get("users", {})
    if not isinstance(users_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in users_raw.items()
    ):
        raise ConfigError(f"{where}: users must map agent emails to Rilla rep emails (strings)")
    deliver_unrecorded = raw.get("deliver_unrecorded", False)
    if not isinstance(deliver_unrecorded, bool):
        raise ConfigError(f"{where}: deliver_unrecorded must be true or false")

    callrail = None
    if "callrail" in raw:
        cr = raw["callrail"]
        cw = f"{where} [callrail]"
        if not isinstance(cr, dict):
            raise ConfigError(f"{cw}: must be a table")
        _check_keys(cr, _CALLRAIL_KEYS, cw)
        api_key = _optional_str(cr, "api_key", cw)
        callrail = CallRailConfig(
            signing_keys=_secrets(cr, "signing_key", cw),
            account_id=_optional_str(cr, "account_id", cw),
            company_id=_optional_str(cr, "company_id", cw),
            api_key=_secret(api_key, "api_key", cw) if api_key else None,
        )
        if bool(callrail.account_id) != bool(callrail.api_key):
            raise ConfigError(f"{cw}: account_id and api_key go together (both or neither)")
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 100:
        raise ConfigError(f"{where}: weight must be a number above 0 (at most 100)")
    max_inflight = raw.get("max_inflight")
    if max_inflight is not None and (isinstance(max_inflight, bool)
                                     or not isinstance(max_inflight, int) or max_inflight < 1):
        raise ConfigError(f"{where}: max_inflight must be a whole number of at least 1")
    callingly = None
    if "callingly" in raw:
        cg = raw["callingly"]
        gw = f"{where} [callingly]"
        if not isinstance(cg, dict):
            raise ConfigError(f"{gw}: must be a table")
        _check_keys(cg, _CALLINGLY_KEYS, gw)
        callingly = CallinglyConfig(webhook_tokens=_secrets(cg, "webhook_token", gw))
    hosts = raw.get("recording_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise ConfigError(f"{where}: recording_hosts must be a list of host names")

    return Tenant(
        slug=slug,
        rilla_api_key=_secret(_required_str(raw, "rilla_api_key", where), "rilla_api_key",
                              where),
        default_user_email=_optional_str(raw, "default_user_email", where),
        deliver_unrecorded=deliver_unrecorded,
        users={k.strip().lower(): v.strip() for k, v in users_raw.items()},
        callrail=callrail,
        callingly=callingly,
        weight=float(weight),
        max_inflight=max_inflight,
        intake_per_second=_positive(raw, "intake_per_second", where),
        intake_mib_per_minute=_positive(raw, "intake_mib_per_minute", where),
        recording_hosts=tuple(h.strip().lower() for h in hosts),
    )


def parse_tenants(text: str, env: Mapping[str, str] | None = None) -> dict[str, Tenant]:
    """Parse tenants TOML text; raises ConfigError with one clear message."""
    env = os.environ if env is None else env
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"tenants file is not valid TOML: {exc}") from None
    _check_keys(doc, {"tenants"}, "tenants file")
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ConfigError("tenants file: [tenants] must be a table")
    if not tenants:
        # A file caught half-written (truncated, then filled) reads as no tenants at all; a
        # worker that accepted that would dead-letter every event as "unknown tenant".
        raise ConfigError("tenants file defines no tenants (add a [tenants.<slug>] table)")
    parsed = {slug: _tenant(slug, raw, env) for slug, raw in tenants.items()}
    _check_shared_accounts(parsed)
    return parsed


def _check_shared_accounts(tenants: Mapping[str, Tenant]) -> None:
    """Tenants sharing a CallRail account must each name their company: reconciliation lists
    the account's calls by company, and without one a tenant would take another's calls."""
    by_account: dict[str, list[Tenant]] = {}
    for t in tenants.values():
        if t.callrail and t.callrail.account_id:
            by_account.setdefault(t.callrail.account_id, []).append(t)
    for account, group in sorted(by_account.items()):
        if len(group) < 2:
            continue
        names = ", ".join(sorted(t.slug for t in group))
        missing = sorted(t.slug for t in group if not t.callrail or not t.callrail.company_id)
        if missing:
            raise ConfigError(
                f"tenants {names} share CallRail account {account}, so each must name its "
                f"company_id; missing for: {', '.join(missing)} (without it reconciliation "
                "would copy one tenant's calls into another's Rilla)")
        companies = [t.callrail.company_id for t in group if t.callrail]
        if len(set(companies)) != len(companies):
            raise ConfigError(f"tenants {names} share CallRail account {account} and name the "
                              "same company_id twice")


def load_tenants(path: str, env: Mapping[str, str] | None = None) -> dict[str, Tenant]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"tenants file {path!r} not found (set TENANTS_FILE)") from None
    return parse_tenants(text, env)


def mask(secret: str | tuple[str, ...] | None) -> str:
    """What an operator may see of a secret (or a rotation pair): its length and last two
    characters at most, and nothing of a short one."""
    if isinstance(secret, tuple):
        return " + ".join(mask(s) for s in secret) if secret else "(unset)"
    if not secret:
        return "(unset)"
    if len(secret) < MIN_SECRET_CHARS:
        return "****"
    return f"****{secret[-2:]} ({len(secret)} chars)"
