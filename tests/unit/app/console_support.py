"""What the admin API and console tests share: an app on fakeredis, a FakeClock and a SQLite
history database, and the history process's part played by ``drain`` (the ``rb:history``
stream written into SQL with the real writer)."""

from __future__ import annotations

from typing import Any

import redis
from flask import Flask
from sqlalchemy.engine import Engine

from app import create_app
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import records as rec
from rilla_bridge.history.db import writing
from rilla_bridge.history.writer import apply
from rilla_bridge.operations import Operations
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant, parse_tenants
from tests.fakes import HistoryRecords, load
from workers.history import _decode_entries, _parse

ADMIN = "admin-token-for-the-tests-0001"
AUTH = {"Authorization": f"Bearer {ADMIN}", "X-Operator": "alice"}
TENANTS = """
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"
default_user_email = "office@acme.example"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"
account_id = "111111111"
api_key = "acme-callrail-api-key-01"
[tenants.acme.callingly]
webhook_token = "acme-callingly-token-01"

[tenants.beta]
rilla_api_key = "beta-rilla-key-000002"
[tenants.beta.callrail]
signing_key = "beta-signing-key-0002"
"""
SECRETS = ("acme-rilla-key-000001", "acme-signing-key-0001", "acme-callrail-api-key-01",
           "acme-callingly-token-01", "beta-rilla-key-000002", "beta-signing-key-0002",
           "5be0a9c1d27f43e8a6b4")   # the last: the fixture's recording access_key


def tenants() -> dict[str, Tenant]:
    return parse_tenants(TENANTS, env={})


def build(client: redis.Redis, clock: FakeClock, engine: Engine, token: str = ADMIN,
          trust_forwarded_for: bool = True) -> Flask:
    app = create_app(settings=Settings(admin_token=token,
                                       trust_forwarded_for=trust_forwarded_for),
                     tenants=tenants(),
                     redis_client=client, clock=clock, engine=engine)
    app.testing = True
    return app


def ops_of(app: Flask) -> Operations:
    with app.app_context():
        from app.admin import operations

        return operations()


def write(engine: Engine, records: list[rec.Record]) -> None:
    with writing(engine) as conn:
        apply(conn, records, tenants())


def drain(client: redis.Redis, engine: Engine) -> int:
    """Write what the stream holds into SQL (the history process's job), then empty it."""
    entries = _decode_entries(client.xrange("rb:history"))
    if not entries:
        return 0
    records, _bad = _parse(entries)
    write(engine, records)
    client.delete("rb:history")
    return len(records)


def seed(engine: Engine, clock: FakeClock) -> dict[str, Any]:
    """A small history: one delivered call, one dead letter with the fixture's body (its
    phone, name and recording access_key), one for beta; returns their ids."""
    h = HistoryRecords(clock)
    body = load("callrail", "post_call")
    out: list[rec.Record] = []
    out += h.delivered_event("ev_ok1", body, call_id=body["resource_id"])
    clock.advance(5)
    out.append(h.received("ev_dead1", body, call_id=body["resource_id"], kind="post_call"))
    out.append(h.attempt("ev_dead1", 1, 422, "dead", reason="User email is not in Rilla",
                         last_payload={"event_id": "x", "media": body["recording"]}))
    out.append(h.dead("ev_dead1", call_id=body["resource_id"]))
    clock.advance(5)
    out.append(h.received("ev_dead2", {"resource_id": "CALb2", "customer_name": "Ann Lee"},
                          tenant="beta", call_id="CALb2"))
    out.append(h.attempt("ev_dead2", 1, 500, "dead", reason="Rilla 500"))
    out.append(h.dead("ev_dead2", tenant="beta", reason_code="rilla_error",
                      reason="Rilla kept failing", status_code=500, call_id="CALb2"))
    write(engine, out)
    return {"body": body, "call_id": body["resource_id"]}
