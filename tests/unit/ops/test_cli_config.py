"""``rilla-bridge tenants check`` with TENANTS_TOML, and the versions the processes report."""

from __future__ import annotations

import time
from pathlib import Path

import fakeredis
import pytest
from click.testing import CliRunner

from ops.cli import common, main
from rilla_bridge.clock import FakeClock
from rilla_bridge.settings import Settings
from rilla_bridge.tenant_config import LiveTenants, TenantsReloader, load_config, version_of

ONE = """
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"
"""
TWO = ONE + """
[tenants.beta]
rilla_api_key = "beta-rilla-key-000002"
"""


@pytest.fixture(autouse=True)
def _redis(monkeypatch: pytest.MonkeyPatch, fake_redis: fakeredis.FakeRedis) -> None:
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)


def _running(text: str, process: str, tmp_path: Path, client: fakeredis.FakeRedis) -> None:
    path = tmp_path / f"{process}.toml"
    path.write_text(text)
    settings = Settings(tenants_file=str(path))
    r = TenantsReloader(settings, LiveTenants(load_config(settings, env={})),
                        FakeClock(time.time()), client=client, process=process, env={})
    r.member += process
    r.report()


def test_check_reads_tenants_toml() -> None:
    result = CliRunner().invoke(main, ["tenants", "check"], env={"TENANTS_TOML": TWO})
    assert result.exit_code == 0, result.output
    assert f"TENANTS_TOML: 2 tenant(s) OK, version {version_of(TWO)}" in result.output
    assert "acme-rilla-key" not in result.output
    assert "none has reported" in result.output


def test_check_lists_each_process_and_marks_the_old_ones(
        tmp_path: Path, fake_redis: fakeredis.FakeRedis) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(TWO)
    _running(TWO, "web", tmp_path, fake_redis)
    _running(ONE, "worker", tmp_path, fake_redis)
    result = CliRunner().invoke(main, ["tenants", "check"], env={"TENANTS_FILE": str(path)})
    assert result.exit_code == 0, result.output
    assert "running processes (2, Redis at redis://localhost:6379/0): 1 run another version" \
        in result.output
    (web,) = [line for line in result.output.splitlines() if line.strip().startswith("web ")]
    (worker,) = [line for line in result.output.splitlines()
                 if line.strip().startswith("worker ")]
    assert version_of(TWO) in web and "not this version" not in web
    assert version_of(ONE) in worker and "<- not this version" in worker


def test_check_with_both_sources_differing_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(ONE)
    result = CliRunner().invoke(main, ["tenants", "check"],
                                env={"TENANTS_FILE": str(path), "TENANTS_TOML": TWO})
    assert result.exit_code == 1
    assert "both TENANTS_TOML and TENANTS_FILE" in result.output
    assert "Traceback" not in result.output
