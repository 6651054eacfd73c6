"""``rilla-bridge tenants check`` (``ops.cli.tenants``): a summary with every secret masked."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from click.testing import CliRunner

from ops.cli import common, main

ENV = {
    "ACME_RILLA_KEY": "acme-rilla-secret-111111",
    "ACME_CALLRAIL_SIGNING_KEY": "acme-signing-secret-2222",
    "AGENCY_CALLRAIL_KEY": "agency-api-secret-333333",
    "ACME_CALLINGLY_TOKEN": "acme-callingly-secret-44",
}

FULL = """
[tenants.acme-roofing]
rilla_api_key = "${ACME_RILLA_KEY}"
default_user_email = "office@acme.example"
deliver_unrecorded = false
[tenants.acme-roofing.users]
"Mike@Acme.example" = "mike.r@acme.example"
[tenants.acme-roofing.callrail]
signing_key = "${ACME_CALLRAIL_SIGNING_KEY}"
account_id = "227799611"
company_id = "COM8154748ae6bd4e278a7cddd38a662f4f"
api_key = "${AGENCY_CALLRAIL_KEY}"
[tenants.acme-roofing.callingly]
webhook_token = "${ACME_CALLINGLY_TOKEN}"

[tenants.b2]
rilla_api_key = "prefix-${ACME_RILLA_KEY}-suffix"
deliver_unrecorded = true
"""


@pytest.fixture(autouse=True)
def _redis(monkeypatch: pytest.MonkeyPatch, fake_redis: fakeredis.FakeRedis) -> None:
    """`tenants check` also lists what the running processes report (none here)."""
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)


def _run_check(tmp_path: Path, text: str, env: dict[str, str],
               args: tuple[str, ...] = ()) -> tuple[int, str]:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["tenants", "check", *args],
                                env={"TENANTS_FILE": str(path), **env})
    return result.exit_code, result.output


def test_tenants_check_prints_summary_without_secrets(tmp_path: Path) -> None:
    code, out = _run_check(tmp_path, FULL, ENV)
    assert code == 0, out
    assert "2 tenant(s) OK" in out
    assert "acme-roofing" in out and "b2" in out
    assert "227799611" in out
    assert "COM8154748ae6bd4e278a7cddd38a662f4f" in out
    assert "callrail" in out and "callingly" in out
    assert "1 user mapping" in out
    assert "deliver_unrecorded false" in out and "deliver_unrecorded true" in out
    for secret in ENV.values():
        assert secret not in out
        assert secret[:8] not in out  # not even a recognisable prefix
    assert "no [callrail] or [callingly] section" in out  # b2 has neither


def test_tenants_check_reports_the_error(tmp_path: Path) -> None:
    code, out = _run_check(tmp_path, FULL.replace("${AGENCY_CALLRAIL_KEY}", "${MISSING_VAR}"),
                           ENV)
    assert code != 0
    assert "MISSING_VAR" in out and "acme-roofing" in out
    for secret in ENV.values():
        assert secret not in out


def test_tenants_check_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tenants", "check"],
                                env={"TENANTS_FILE": str(tmp_path / "nope.toml")})
    assert result.exit_code != 0
    assert "not found" in result.output


def test_tenants_check_file_option_wins_over_the_environment(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[tenants.solo]\nrilla_api_key = "solo-rilla-key-000001"\n')
    code, out = _run_check(tmp_path, "[tenants.acme\n", ENV, ("--file", str(other)))
    assert code == 0, out
    assert f"{other}: 1 tenant(s) OK" in out and "solo" in out
    assert "solo-rilla-key-000001" not in out


def test_tenants_check_masks_both_keys_of_a_rotation(tmp_path: Path) -> None:
    text = FULL.replace('signing_key = "${ACME_CALLRAIL_SIGNING_KEY}"',
                        'signing_key = ["${ACME_CALLRAIL_SIGNING_KEY}", "acme-signing-new-5555"]')
    code, out = _run_check(tmp_path, text, ENV)
    assert code == 0, out
    assert "signing_key ****22 (24 chars) + ****55 (21 chars)" in out
    assert "acme-signing-new-5555" not in out and "acme-sig" not in out


def test_tenants_check_names_the_tenants_sharing_an_account_without_companies(
        tmp_path: Path) -> None:
    text = FULL.replace("[tenants.b2]", '[tenants.b2.callrail]\n'
                        'signing_key = "b2-signing-secret-66666"\naccount_id = "227799611"\n'
                        'api_key = "${AGENCY_CALLRAIL_KEY}"\n\n[tenants.b2]')
    code, out = _run_check(tmp_path, text, ENV)
    assert code != 0
    assert "tenants acme-roofing, b2 share CallRail account 227799611" in out
    assert "missing for: b2" in out
    for secret in (*ENV.values(), "b2-signing-secret-66666"):
        assert secret not in out


def test_tenants_check_refuses_a_short_secret(tmp_path: Path) -> None:
    code, out = _run_check(tmp_path, FULL, {**ENV, "ACME_CALLINGLY_TOKEN": "2c"})
    assert code != 0
    assert "tenant 'acme-roofing' [callingly]: webhook_token is 2 characters" in out
    assert "at least 16" in out
