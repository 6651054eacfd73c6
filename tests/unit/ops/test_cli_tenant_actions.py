"""``rilla-bridge tenants pause|resume|urls``: the console's tenant actions on the command
line, through the same service layer (audited like the console's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ops.cli import common, main
from rilla_bridge import keys
from rilla_bridge.history import records
from tests.unit.app.console_support import TENANTS


@pytest.fixture
def env(fake_redis: fakeredis.FakeRedis, history_db: Engine, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(path),
            "DATABASE_URL": str(history_db.url), "RILLA_BRIDGE_OPERATOR": "cli:sam",
            "PUBLIC_URL": ""}


def _audit(client: fakeredis.FakeRedis) -> list[dict[str, object]]:
    out = []
    entries: Any = client.xrange(keys.HISTORY)
    for _, fields in entries:
        if fields[b"r"] == records.AUDIT.encode():
            out.append(records.Record.from_entry("0-1", fields).data)
    return out


def test_pause_and_resume(env: dict[str, str], fake_redis: fakeredis.FakeRedis) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["tenants", "pause", "acme"], env=env)
    assert out.exit_code == 0, out.output
    assert fake_redis.sismember(keys.PAUSED, "acme")
    out = runner.invoke(main, ["tenants", "resume", "acme"], env=env)
    assert out.exit_code == 0 and "delivery resumed" in out.output
    assert not fake_redis.sismember(keys.PAUSED, "acme")
    assert [(a["actor"], a["action"]) for a in _audit(fake_redis)] == [
        ("cli:sam", "tenant.pause"), ("cli:sam", "tenant.resume")]
    bad = runner.invoke(main, ["tenants", "pause", "nobody"], env=env)
    assert bad.exit_code != 0 and "no tenant nobody" in bad.output


def test_urls_masked_unless_asked(env: dict[str, str], fake_redis: fakeredis.FakeRedis) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["tenants", "urls"], env=env).exit_code != 0   # no base URL
    out = runner.invoke(main, ["tenants", "urls"], env={**env, "PUBLIC_URL": "https://rb.example"})
    assert out.exit_code == 0, out.output
    assert "https://rb.example/webhooks/callrail/acme" in out.output
    assert "https://rb.example/webhooks/callrail/beta" in out.output
    assert "/webhooks/callingly/acme?token=****01" in out.output
    assert "acme-callingly-token-01" not in out.output and _audit(fake_redis) == []
    shown = runner.invoke(main, ["tenants", "urls", "acme", "--base-url", "https://x.example",
                                 "--show-token"], env=env)
    assert "https://x.example/webhooks/callingly/acme?token=acme-callingly-token-01" \
        in shown.output
    assert [a["action"] for a in _audit(fake_redis)] == ["tenant.reveal_callingly_token"]
