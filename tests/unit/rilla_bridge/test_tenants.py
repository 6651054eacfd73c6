"""The tenants file (SPEC "Configuration"): ``rilla_bridge.tenants``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rilla_bridge.settings import ConfigError
from rilla_bridge.tenants import load_tenants, mask, parse_tenants

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


def test_full_example_with_interpolation() -> None:
    tenants = parse_tenants(FULL, env=ENV)
    assert set(tenants) == {"acme-roofing", "b2"}
    t = tenants["acme-roofing"]
    assert t.rilla_api_key == ENV["ACME_RILLA_KEY"]
    assert t.default_user_email == "office@acme.example"
    assert t.deliver_unrecorded is False
    assert t.callrail is not None and t.callrail.signing_key == ENV["ACME_CALLRAIL_SIGNING_KEY"]
    assert t.callrail.api_key == ENV["AGENCY_CALLRAIL_KEY"]
    assert t.callrail.account_id == "227799611" and t.callrail.api_enabled
    assert t.callrail.company_id == "COM8154748ae6bd4e278a7cddd38a662f4f"
    assert t.callingly is not None and t.callingly.webhook_token == ENV["ACME_CALLINGLY_TOKEN"]
    assert t.rep_email("mike@acme.example") == "mike.r@acme.example"
    assert t.rep_email(None) == "office@acme.example"
    b2 = tenants["b2"]
    assert b2.rilla_api_key == f"prefix-{ENV['ACME_RILLA_KEY']}-suffix"
    assert b2.deliver_unrecorded is True and b2.callrail is None and b2.callingly is None
    assert set(t.secrets()) == set(ENV.values())


def test_interpolation_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert parse_tenants(FULL)["acme-roofing"].rilla_api_key == ENV["ACME_RILLA_KEY"]


def test_interpolated_value_is_not_interpolated_again() -> None:
    env = {"A": "${B}", "B": "nope"}
    t = parse_tenants('[tenants.x]\nrilla_api_key = "${A}"\n', env=env)["x"]
    assert t.rilla_api_key == "${B}"


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "[tenants]\n"])
def test_a_file_without_tenants_is_an_error(text: str) -> None:
    # An empty file is what a worker sees while an editor truncates and rewrites it.
    assert _error(text, env={}) == (
        "tenants file defines no tenants (add a [tenants.<slug>] table)")


def _error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_tenants(text, env=ENV if env is None else env)
    return str(info.value)


@pytest.mark.parametrize(("text", "must_name"), [
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\nrilla_key = "x"\n',
                 ("acme", "rilla_key"), id="unknown-tenant-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'signing_key = "s"\nsigningkey = "x"\n', ("acme", "signingkey"),
                 id="unknown-callrail-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callingly]\n'
                 'webhook_token = "t"\ntoken = "x"\n', ("acme", "token"),
                 id="unknown-callingly-key"),
    pytest.param('[tenant.acme]\nrilla_api_key = "k"\n', ("tenant",), id="unknown-top-level"),
    pytest.param('[tenants.acme]\nrilla_api_key = "${NOT_SET_ANYWHERE}"\n',
                 ("acme", "rilla_api_key", "NOT_SET_ANYWHERE"), id="missing-variable"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'signing_key = "${NO_SUCH_KEY_VAR}"\n',
                 ("acme", "signing_key", "NO_SUCH_KEY_VAR"), id="missing-variable-nested"),
    pytest.param('[tenants.Acme]\nrilla_api_key = "k"\n', ("Acme", "slug"), id="bad-slug-case"),
    pytest.param('[tenants."acme_roofing"]\nrilla_api_key = "k"\n', ("acme_roofing", "slug"),
                 id="bad-slug-underscore"),
    pytest.param('[tenants."acme roofing"]\nrilla_api_key = "k"\n', ("acme roofing", "slug"),
                 id="bad-slug-space"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'account_id = "1"\n', ("acme", "signing_key"), id="missing-signing-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'signing_key = ""\n', ("acme", "signing_key"), id="empty-signing-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callingly]\n',
                 ("acme", "webhook_token"), id="missing-webhook-token"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callingly]\n'
                 'webhook_token = "  "\n', ("acme", "webhook_token"), id="blank-webhook-token"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'signing_key = "s"\naccount_id = "227799611"\n', ("acme", "api_key"),
                 id="account-id-without-api-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\n[tenants.acme.callrail]\n'
                 'signing_key = "s"\napi_key = "a"\n', ("acme", "account_id"),
                 id="api-key-without-account-id"),
    pytest.param('[tenants.acme]\ndefault_user_email = "a@b.c"\n', ("acme", "rilla_api_key"),
                 id="missing-rilla-key"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\ndeliver_unrecorded = "false"\n',
                 ("acme", "deliver_unrecorded"), id="string-boolean"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\nusers = "x"\n', ("acme", "users"),
                 id="users-not-a-table"),
    pytest.param('[tenants.acme]\nrilla_api_key = "k"\ncallrail = "x"\n', ("acme", "callrail"),
                 id="callrail-not-a-table"),
    pytest.param("[tenants.acme\n", ("TOML",), id="bad-toml"),
])
def test_one_clear_error(text: str, must_name: tuple[str, ...]) -> None:
    message = _error(text)
    for word in must_name:
        assert word in message, message
    assert "\n" not in message.strip()


def test_errors_never_print_secret_values() -> None:
    message = _error('[tenants.acme]\nrilla_api_key = "${ACME_RILLA_KEY}"\nnope = 1\n'
                     '[tenants.acme.callrail]\nsigning_key = "${ACME_CALLRAIL_SIGNING_KEY}"\n'
                     'account_id = "1"\n')
    for secret in ENV.values():
        assert secret not in message
    message = _error('[tenants.acme]\nrilla_api_key = "${ACME_RILLA_KEY}"\n'
                     '[tenants.acme.callrail]\nsigning_key = "${ACME_CALLRAIL_SIGNING_KEY}"\n'
                     'account_id = "1"\n')
    assert "api_key" in message
    for secret in ENV.values():
        assert secret not in message


def test_load_tenants_reads_the_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(FULL, encoding="utf-8")
    assert set(load_tenants(str(path), env=ENV)) == {"acme-roofing", "b2"}
    with pytest.raises(ConfigError) as info:
        load_tenants(str(tmp_path / "nope.toml"), env=ENV)
    assert "nope.toml" in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize(("secret", "shown"), [
    (None, "(unset)"), ("", "(unset)"), ("short-key01", "****"),
    ("acme-rilla-secret-111111", "****11 (24 chars)"),
])
def test_mask_shows_at_most_the_last_two_characters(secret: str | None, shown: str) -> None:
    assert mask(secret) == shown
