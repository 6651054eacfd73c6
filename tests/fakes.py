"""Fakes and builders shared by the tests (no test module imports another's helpers).

``FakeRilla`` stands in for ``rilla_bridge.clients.rilla.RillaClient``;
``tests/unit/rilla_bridge/clients/test_rilla_contract.py`` runs the same contract against the
real client over the fake and over the sandbox, so the fake stays honest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from workers.runtime import Runtime, build_runtime

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ACME_KEY = "acme-rilla-key-000001"
BETA_KEY = "beta-rilla-key-000002"

TENANTS = f"""
[tenants.acme]
rilla_api_key = "{ACME_KEY}"
default_user_email = "office@acme.example"
[tenants.acme.users]
"mike@acme.example" = "mike.r@acme.example"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"

[tenants.beta]
rilla_api_key = "{BETA_KEY}"
[tenants.beta.callrail]
signing_key = "beta-signing-key-0002"
[tenants.beta.callingly]
webhook_token = "beta-callingly-token-02"
"""


def load(source: str, name: str) -> dict[str, Any]:
    """A real-shaped webhook body from ``tests/fixtures/<source>/<name>.json``."""
    body: dict[str, Any] = json.loads((FIXTURES / source / f"{name}.json").read_bytes())
    return body


class FakeRilla:
    """Answers from a script (then 200); ``users`` (if set) is the org's allowed rep emails."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.script: list[RillaResult] = []
        self.users: set[str] | None = None

    def _answer(self) -> RillaResult:
        return self.script.pop(0) if self.script else RillaResult("ok", 200, "Successfully")

    def upsert(self, api_key: str, payload: Mapping[str, Any]) -> RillaResult:
        self.calls.append(("upsert", api_key, json.loads(json.dumps(payload))))
        if self.users is not None and payload.get("user_email") not in self.users:
            return RillaResult("permanent", 422, "User email is not in Rilla")
        return self._answer()

    def delete(self, api_key: str, event_id: str) -> RillaResult:
        self.calls.append(("delete", api_key, event_id))
        return self._answer()

    @property
    def upserts(self) -> list[dict[str, Any]]:
        return [c[2] for c in self.calls if c[0] == "upsert"]


def make_runtime(client: redis.Redis, clock: FakeClock | None = None,
                 tenants: str = TENANTS, **settings: Any) -> Runtime:
    """A worker Runtime over ``client`` with a FakeRilla, a FakeClock and test settings."""
    values: dict[str, Any] = {"retry_base_seconds": 5.0, "retry_max_delay_seconds": 60.0,
                              "retry_max_age_seconds": 3600.0, "stale_pending_seconds": 10}
    values.update(settings)
    return build_runtime(Settings(**values), client=client,
                         tenants=parse_tenants(tenants, env={}), clock=clock or FakeClock(),
                         rilla=FakeRilla())
