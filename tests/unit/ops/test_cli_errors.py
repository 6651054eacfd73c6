"""No command ends in a traceback for a known failure (``ops.cli._Main``): a configuration
error, Redis or the history database not answering is one line and exit status 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ops.cli import common, main
from rilla_bridge.settings import ConfigError

TENANTS = """
[tenants.demo]
rilla_api_key = "demo-rilla-key-0001"
[tenants.demo.callrail]
signing_key = "072e77e426f92738a72fe23c4d1953b4"
account_id = "227799611"
api_key = "demo-callrail-api-key-0001"
"""


@pytest.fixture
def tenants(tmp_path: Path) -> str:
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    return str(path)


def _one_line_error(result: Result, *fragments: str) -> str:
    out = result.output
    assert result.exit_code == 1, out
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in out
    line = str(out.strip().splitlines()[-1])
    assert line.startswith("Error: ")
    for fragment in fragments:
        assert fragment in line
    return line


def test_backfill_with_redis_down_is_one_line(tenants: str) -> None:
    result = CliRunner().invoke(main, ["backfill", "--tenant", "demo", "--since", "2026-11-20",
                                       "--yes"],
                                env={"TENANTS_FILE": tenants,
                                     "REDIS_URL": "redis://:pa55word-redis-x@127.0.0.1:1/3"})
    line = _one_line_error(result, "Redis at redis://:***@127.0.0.1:1/3 (REDIS_URL)",
                           "ConnectionError")
    assert "pa55word" not in result.output and line


def test_a_config_error_deep_in_a_command_is_one_line(
        tenants: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise ConfigError("CALLRAIL_HOURLY_LIMIT must be an integer, got 'x'")

    monkeypatch.setattr(common, "guard", broken)
    result = CliRunner().invoke(main, ["quota"], env={"TENANTS_FILE": tenants})
    _one_line_error(result, "configuration: CALLRAIL_HOURLY_LIMIT must be an integer")


def test_the_history_database_down_is_one_line(tenants: str) -> None:
    result = CliRunner().invoke(main, ["db", "upgrade"], env={
        "TENANTS_FILE": tenants,
        "DATABASE_URL": "postgresql://ops:db-pa55word-x@127.0.0.1:1/rb"})
    _one_line_error(result, "127.0.0.1:1")
    assert "db-pa55word-x" not in result.output


def test_quota_prints_a_table(tenants: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fakeredis

    from rilla_bridge.clock import FakeClock
    from rilla_bridge.quota import QuotaGuard
    from rilla_bridge.scripts import Scripts
    from rilla_bridge.settings import Settings

    fake = fakeredis.FakeRedis()
    clock = FakeClock()
    guard = QuotaGuard.from_settings(Settings(), fake, Scripts(fake), clock)
    for i in range(3):
        guard.submit("227799611", "live", {"n": i})
    guard.submit("227799611", "backfill", {"n": 9})
    assert len(guard.take("227799611", 2)) == 2
    monkeypatch.setattr(common, "client", lambda settings: fake)
    monkeypatch.setattr(common, "guard", lambda settings, client: guard)
    result = CliRunner().invoke(main, ["quota"], env={"TENANTS_FILE": tenants})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("CallRail account 227799611: not paused; limits 1000/hour, "
                        "10000/day")
    assert lines[1].split() == ["LANE", "HOUR", "USED", "HOUR", "LEFT", "DAY", "USED", "DAY",
                                "LEFT", "WAITING"]
    assert lines[2].split() == ["live", "2", "998", "2", "9998", "1"]
    assert lines[3].split()[0] == "backfill" and lines[3].split()[-1] == "1"
    assert lines[-1].split() == ["total", "2", "998", "2", "9998", "2"]
    assert "{" not in result.output     # not Python dicts
