"""Shared helpers for the transform tests: fixtures through a JSON round trip, tenants."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rilla_bridge.tenants import Tenant
from rilla_bridge.transform import Skip, Snapshot, build_action, merge_snapshots, parse_event

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def load(source: str, name: str) -> dict[str, Any]:
    """A fixture body as the worker sees it: bytes -> JSON -> dict, nothing JSON can't carry."""
    body: dict[str, Any] = json.loads((FIXTURES / source / f"{name}.json").read_bytes())
    return body


def tenant(**overrides: Any) -> Tenant:
    values: dict[str, Any] = {
        "slug": "acme",
        "rilla_api_key": "rk_test_0000000000",
        "default_user_email": "office@acme.example",
        "users": {"mike@acme.example": "mike.r@acme.example"},
    }
    values.update(overrides)
    return Tenant(**values)


def snap(source: str, kind: str, raw: dict[str, Any]) -> Snapshot:
    result = parse_event(source, kind, raw)
    assert isinstance(result, Snapshot), result
    return result


def stored(snapshot: Snapshot, received_at: float) -> dict[str, Any]:
    """What the worker keeps in Redis for one snapshot (a JSON round trip, as there)."""
    item = {"rank": snapshot.rank, "received_at": received_at, "fields": snapshot.fields}
    loaded: dict[str, Any] = json.loads(json.dumps(item))
    return loaded


def action_for(source: str, events: list[tuple[str, dict[str, Any]]], t: Tenant | None = None,
               resolved: Mapping[str, str] | None = None) -> Any:
    """Parse events (received in list order), merge them and build the action."""
    snaps = [snap(source, kind, raw) for kind, raw in events]
    assert len({s.call_id for s in snaps}) == 1
    merged = merge_snapshots([stored(s, float(i)) for i, s in enumerate(snaps)])
    return build_action(source, snaps[0].call_id, merged, t or tenant(), resolved or {})


def skip_reason(result: object) -> str:
    assert isinstance(result, Skip), result
    return result.reason
