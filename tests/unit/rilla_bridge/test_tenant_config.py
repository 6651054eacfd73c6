"""``rilla_bridge.tenant_config``: where the tenants come from (TENANTS_TOML or TENANTS_FILE),
reloading a changed file whole or not at all, and the version each process reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.clock import FakeClock
from rilla_bridge.settings import ConfigError, Settings
from rilla_bridge.tenant_config import (
    REPORT_STALE_SECONDS,
    LiveTenants,
    TenantsReloader,
    load_config,
    process_versions,
    version_of,
)

ONE = """
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"
"""
TWO = ONE + """
[tenants.beta]
rilla_api_key = "beta-rilla-key-000002"
default_user_email = "office@beta.example"
"""


def _settings(path: Path, **kw: object) -> Settings:
    return Settings(tenants_file=str(path), **kw)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "tenants.toml"
    p.write_text(ONE)
    return p


# -- where the configuration comes from ------------------------------------------------------

def test_tenants_toml_is_used_without_a_file(tmp_path: Path) -> None:
    settings = Settings.from_env({"TENANTS_TOML": TWO})
    config = load_config(settings, env={})
    assert config.source == "TENANTS_TOML" and sorted(config.tenants) == ["acme", "beta"]
    assert config.version == version_of(TWO)


def test_tenants_toml_wins_over_a_file_with_the_same_content(path: Path) -> None:
    settings = Settings.from_env({"TENANTS_TOML": ONE, "TENANTS_FILE": str(path)})
    assert load_config(settings, env={}).source == "TENANTS_TOML"


def test_both_set_and_different_is_an_error(path: Path) -> None:
    settings = Settings.from_env({"TENANTS_TOML": TWO, "TENANTS_FILE": str(path)})
    with pytest.raises(ConfigError, match="both TENANTS_TOML and TENANTS_FILE"):
        load_config(settings, env={})


def test_neither_set_names_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)   # no tenants.toml here
    with pytest.raises(ConfigError, match=r"set TENANTS_FILE .* or TENANTS_TOML"):
        load_config(Settings.from_env({}), env={})


def test_a_named_file_that_is_missing_names_it(tmp_path: Path) -> None:
    settings = Settings.from_env({"TENANTS_FILE": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match=r"nope\.toml.*not found"):
        load_config(settings, env={})


def test_tenants_toml_is_not_in_the_settings_repr() -> None:
    assert "acme-rilla-key" not in repr(Settings.from_env({"TENANTS_TOML": ONE}))


# -- reloading ---------------------------------------------------------------------------------

def _reloader(path: Path, clock: FakeClock, client: fakeredis.FakeRedis | None = None,
              process: str = "worker") -> tuple[LiveTenants, TenantsReloader]:
    settings = _settings(path)
    live = LiveTenants(load_config(settings, env={}))
    return live, TenantsReloader(settings, live, clock, client=client, process=process, env={})


def test_a_changed_file_is_swapped_in_whole(path: Path, clock: FakeClock) -> None:
    live, reloader = _reloader(path, clock)
    before = live.version
    assert reloader.poll() == "unchanged" and list(live) == ["acme"]
    path.write_text(TWO)
    assert reloader.poll() == "settling" and list(live) == ["acme"]   # read it again first
    assert reloader.poll() == "reloaded"
    assert live.version == version_of(TWO) != before
    assert sorted(live) == ["acme", "beta"]
    assert live["beta"].default_user_email == "office@beta.example"
    assert reloader.poll() == "unchanged"


@pytest.mark.parametrize("bad, reason", [
    (TWO.replace("default_user_email", "default_user_mail"), "unknown key 'default_user_mail'"),
    (TWO + 'weight = "x"\n', "weight must be a number"),
    (TWO.replace('"beta-rilla-key-000002"', '"${BETA_KEY}"'), "BETA_KEY is not set"),
    ("", "defines no tenants"),                       # a file caught truncated
    ("[tenants.acme\n", "not valid TOML"),
])
def test_a_bad_change_is_refused_and_the_old_configuration_kept(
        path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, bad: str,
        reason: str) -> None:
    live, reloader = _reloader(path, clock)
    old = live.config
    path.write_text(bad)
    with caplog.at_level(logging.ERROR, "rilla_bridge.config"):
        assert reloader.poll() == "settling"
        assert reloader.poll() == "refused"
        assert reloader.poll() == "refused"     # the same bad file: logged once
    assert live.config is old and list(live) == ["acme"]   # nothing of it applied
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0].__dict__["reason"]
    path.write_text(TWO)                        # fixed: taken once it reads the same twice
    assert reloader.poll() == "settling"
    assert reloader.poll() == "reloaded" and sorted(live) == ["acme", "beta"]


def test_a_file_caught_half_written_is_never_applied(path: Path, clock: FakeClock) -> None:
    """A tool writing the file in pieces: the first read sees a shorter file that parses
    (a tenant missing); by the next check it is whole, and only the whole one is applied."""
    live, reloader = _reloader(path, clock)
    path.write_text(TWO)
    assert reloader.poll() == "settling"
    assert reloader.poll() == "reloaded" and sorted(live) == ["acme", "beta"]
    three = TWO + TWO.split("[tenants.beta]")[1].join(["[tenants.gamma]", ""]).replace(
        "beta", "gamma")
    path.write_text(ONE)                       # mid-write: only acme so far
    assert reloader.poll() == "settling" and sorted(live) == ["acme", "beta"]
    path.write_text(three)                     # the whole new file
    assert reloader.poll() == "settling" and sorted(live) == ["acme", "beta"]
    assert reloader.poll() == "reloaded" and sorted(live) == ["acme", "beta", "gamma"]


def test_a_deleted_file_is_refused(path: Path, clock: FakeClock) -> None:
    live, reloader = _reloader(path, clock)
    path.unlink()
    assert reloader.poll() == "refused" and list(live) == ["acme"]


def test_tenants_toml_never_reloads(tmp_path: Path, clock: FakeClock) -> None:
    settings = Settings.from_env({"TENANTS_TOML": ONE})
    live = LiveTenants(load_config(settings, env={}))
    reloader = TenantsReloader(settings, live, clock, env={})
    assert reloader.poll() == "unchanged" and live.version == version_of(ONE)


# -- the version each process reports ------------------------------------------------------------

def test_each_process_reports_its_version_and_silent_ones_drop_out(
        path: Path, clock: FakeClock, fake_redis: fakeredis.FakeRedis) -> None:
    _, web = _reloader(path, clock, fake_redis, "web")
    _, worker = _reloader(path, clock, fake_redis, "worker")
    worker.member += "-2"   # another process (same pid in a test)
    web.tick()
    worker.tick()
    rows = process_versions(fake_redis, clock.now())
    assert [(r["process"], r["version"]) for r in rows] == [("web", version_of(ONE)),
                                                            ("worker", version_of(ONE))]
    assert fake_redis.ttl(keys.CONFIG_PROCESSES) > 0
    path.write_text(TWO)
    clock.advance(REPORT_STALE_SECONDS - 1)
    worker.tick()           # the worker reads the change, then reloads it at its next check;
    worker.tick()           # the web is silent (stopped)
    rows = process_versions(fake_redis, clock.now())
    assert {r["process"]: r["version"] for r in rows} == {"web": version_of(ONE),
                                                          "worker": version_of(TWO)}
    clock.advance(2)
    rows = process_versions(fake_redis, clock.now())
    assert [r["process"] for r in rows] == ["worker"]
    assert fake_redis.hlen(keys.CONFIG_PROCESSES) == 1


def test_a_refused_change_is_reported_with_its_reason(
        path: Path, clock: FakeClock, fake_redis: fakeredis.FakeRedis) -> None:
    _, worker = _reloader(path, clock, fake_redis)
    path.write_text(TWO + "colour = 1\n")
    worker.tick()
    worker.tick()
    (entry,) = [json.loads(v) for v in fake_redis.hvals(keys.CONFIG_PROCESSES)]
    assert entry["version"] == version_of(ONE)
    assert entry["refused_version"] == version_of(TWO + "colour = 1\n")
    assert "unknown key 'colour'" in entry["refused_reason"]
    worker.forget()
    assert fake_redis.hlen(keys.CONFIG_PROCESSES) == 0
