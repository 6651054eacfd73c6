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
    assert t.callrail is not None
    assert t.callrail.signing_keys == (ENV["ACME_CALLRAIL_SIGNING_KEY"],)
    assert t.callrail.api_key == ENV["AGENCY_CALLRAIL_KEY"]
    assert t.callrail.account_id == "227799611" and t.callrail.api_enabled
    assert t.callrail.company_id == "COM8154748ae6bd4e278a7cddd38a662f4f"
    assert t.callingly is not None
    assert t.callingly.webhook_tokens == (ENV["ACME_CALLINGLY_TOKEN"],)
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
    env = {"A": "${B}-and-sixteen-more", "B": "nope"}
    t = parse_tenants('[tenants.x]\nrilla_api_key = "${A}"\n', env=env)["x"]
    assert t.rilla_api_key == "${B}-and-sixteen-more"


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "[tenants]\n"])
def test_a_file_without_tenants_is_an_error(text: str) -> None:
    # An empty file is what a worker sees while an editor truncates and rewrites it.
    assert _error(text, env={}) == (
        "tenants file defines no tenants (add a [tenants.<slug>] table)")


def _error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_tenants(text, env=ENV if env is None else env)
    return str(info.value)


# Valid secrets (16 characters or more), so that each case below fails for its own reason.
RK = 'rilla_api_key = "acme-rilla-key-000001"\n'
SK = 'signing_key = "acme-signing-key-0001"\n'
TK = 'webhook_token = "acme-callingly-token-01"\n'
AK = 'api_key = "agency-api-key-000003"\n'


@pytest.mark.parametrize(("text", "must_name"), [
    pytest.param(f'[tenants.acme]\n{RK}rilla_key = "x"\n', ("acme", "rilla_key"),
                 id="unknown-tenant-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n{SK}signingkey = "x"\n',
                 ("acme", "signingkey"), id="unknown-callrail-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callingly]\n{TK}token = "x"\n',
                 ("acme", "token"), id="unknown-callingly-key"),
    pytest.param(f"[tenant.acme]\n{RK}", ("tenant",), id="unknown-top-level"),
    pytest.param('[tenants.acme]\nrilla_api_key = "${NOT_SET_ANYWHERE}"\n',
                 ("acme", "rilla_api_key", "NOT_SET_ANYWHERE"), id="missing-variable"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n'
                 'signing_key = "${NO_SUCH_KEY_VAR}"\n',
                 ("acme", "signing_key", "NO_SUCH_KEY_VAR"), id="missing-variable-nested"),
    pytest.param(f"[tenants.Acme]\n{RK}", ("Acme", "slug"), id="bad-slug-case"),
    pytest.param(f'[tenants."acme_roofing"]\n{RK}', ("acme_roofing", "slug"),
                 id="bad-slug-underscore"),
    pytest.param(f'[tenants."acme roofing"]\n{RK}', ("acme roofing", "slug"),
                 id="bad-slug-space"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\naccount_id = "1"\n',
                 ("acme", "signing_key"), id="missing-signing-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\nsigning_key = ""\n',
                 ("acme", "signing_key"), id="empty-signing-key"),
    pytest.param(f"[tenants.acme]\n{RK}[tenants.acme.callingly]\n",
                 ("acme", "webhook_token"), id="missing-webhook-token"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callingly]\nwebhook_token = "  "\n',
                 ("acme", "webhook_token"), id="blank-webhook-token"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n{SK}account_id = "227799611"\n',
                 ("acme", "api_key"), id="account-id-without-api-key"),
    pytest.param(f"[tenants.acme]\n{RK}[tenants.acme.callrail]\n{SK}{AK}",
                 ("acme", "account_id"), id="api-key-without-account-id"),
    pytest.param('[tenants.acme]\ndefault_user_email = "a@b.c"\n', ("acme", "rilla_api_key"),
                 id="missing-rilla-key"),
    pytest.param(f'[tenants.acme]\n{RK}deliver_unrecorded = "false"\n',
                 ("acme", "deliver_unrecorded"), id="string-boolean"),
    pytest.param(f'[tenants.acme]\n{RK}users = "x"\n', ("acme", "users"),
                 id="users-not-a-table"),
    pytest.param(f'[tenants.acme]\n{RK}callrail = "x"\n', ("acme", "callrail"),
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


# -- fair delivery: weight and max_inflight ---------------------------------------------------

def test_weight_and_max_inflight_default_to_the_settings() -> None:
    t = parse_tenants('[tenants.acme]\nrilla_api_key = "acme-rilla-key-000001"\n',
                      env={})["acme"]
    assert (t.weight, t.max_inflight) == (1.0, None)


@pytest.mark.parametrize(("lines", "weight", "max_inflight"), [
    ("weight = 2", 2.0, None), ("weight = 0.25", 0.25, None), ("weight = 100", 100.0, None),
    ("max_inflight = 1", 1.0, 1), ("weight = 3\nmax_inflight = 64", 3.0, 64),
])
def test_weight_and_max_inflight(lines: str, weight: float, max_inflight: int | None) -> None:
    text = f'[tenants.acme]\nrilla_api_key = "acme-rilla-key-000001"\n{lines}\n'
    t = parse_tenants(text, env={})["acme"]
    assert (t.weight, t.max_inflight) == (weight, max_inflight)
    assert isinstance(t.weight, float)


@pytest.mark.parametrize(("line", "word"), [
    ("weight = 0", "weight"), ("weight = -1", "weight"), ("weight = 100.5", "weight"),
    ('weight = "2"', "weight"), ("weight = true", "weight"),
    ("max_inflight = 0", "max_inflight"), ("max_inflight = -3", "max_inflight"),
    ("max_inflight = 1.5", "max_inflight"), ('max_inflight = "8"', "max_inflight"),
    ("max_inflight = true", "max_inflight"),
])
def test_bad_weight_or_max_inflight_is_one_clear_error(line: str, word: str) -> None:
    message = _error(f'[tenants.acme]\nrilla_api_key = "acme-rilla-key-000001"\n{line}\n',
                     env={})
    assert "acme" in message and word in message
    assert "\n" not in message.strip()


# -- secrets: at least 16 characters, two during a rotation ----------------------------------

@pytest.mark.parametrize(("text", "where", "key"), [
    pytest.param('[tenants.acme]\nrilla_api_key = "short-rilla-key"\n', "tenant 'acme'",
                 "rilla_api_key", id="rilla-api-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\nsigning_key = "short-signing"\n',
                 "tenant 'acme' [callrail]", "signing_key", id="signing-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n{SK}account_id = "1"\n'
                 'api_key = "short-api-key"\n', "tenant 'acme' [callrail]", "api_key",
                 id="api-key"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callingly]\nwebhook_token = "2c"\n',
                 "tenant 'acme' [callingly]", "webhook_token", id="webhook-token"),
    pytest.param(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n'
                 'signing_key = ["acme-signing-key-0001", "short-signing"]\n',
                 "tenant 'acme' [callrail]", "signing_key", id="second-of-a-rotation"),
])
def test_a_short_secret_is_one_clear_error(text: str, where: str, key: str) -> None:
    message = _error(text, env={})
    assert message.startswith(f"{where}: {key} is ") and "at least 16" in message
    assert "openssl rand" in message and "\n" not in message
    for short in ("short-rilla-key", "short-signing", "short-api-key", '"2c"'):
        assert short not in message                        # the value itself is not printed


def test_sixteen_characters_are_enough() -> None:
    t = parse_tenants('[tenants.acme]\nrilla_api_key = "0123456789abcdef"\n'
                      '[tenants.acme.callingly]\nwebhook_token = "fedcba9876543210"\n',
                      env={})["acme"]
    assert t.rilla_api_key == "0123456789abcdef"
    assert t.callingly is not None and t.callingly.webhook_tokens == ("fedcba9876543210",)


def test_a_key_being_rotated_may_be_a_list_of_two() -> None:
    t = parse_tenants(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n'
                      'signing_key = ["acme-signing-key-0001", " acme-signing-key-0002 "]\n'
                      '[tenants.acme.callingly]\n'
                      'webhook_token = ["acme-callingly-token-01", "acme-callingly-token-02"]\n',
                      env={})["acme"]
    assert t.callrail is not None and t.callingly is not None
    assert t.callrail.signing_keys == ("acme-signing-key-0001", "acme-signing-key-0002")
    assert t.callingly.webhook_tokens == ("acme-callingly-token-01", "acme-callingly-token-02")
    assert {"acme-signing-key-0001", "acme-signing-key-0002", "acme-callingly-token-01",
            "acme-callingly-token-02"} <= set(t.secrets())      # every one is masked
    one = parse_tenants(f'[tenants.acme]\n{RK}[tenants.acme.callrail]\n'
                        'signing_key = ["acme-signing-key-0001"]\n', env={})["acme"]
    assert one.callrail is not None and one.callrail.signing_keys == ("acme-signing-key-0001",)


@pytest.mark.parametrize("value", [
    "[]", '["acme-signing-key-0001", "acme-signing-key-0002", "acme-signing-key-0003"]',
    '["acme-signing-key-0001", ""]', '["acme-signing-key-0001", 7]', "7",
    '["acme-signing-key-0001", ["acme-signing-key-0002"]]',
])
def test_a_rotation_is_one_or_two_non_empty_strings(value: str) -> None:
    message = _error(f"[tenants.acme]\n{RK}[tenants.acme.callrail]\nsigning_key = {value}\n",
                     env={})
    assert message == ("tenant 'acme' [callrail]: signing_key is required: a non-empty "
                       "string, or a list of two while it is being rotated")


@pytest.mark.parametrize(("secret", "shown"), [
    (("acme-rilla-secret-111111", "acme-rilla-secret-222222"),
     "****11 (24 chars) + ****22 (24 chars)"),
    (("acme-rilla-secret-111111",), "****11 (24 chars)"),
    (("acme-rilla-secret-111111", "2c"), "****11 (24 chars) + ****"),
    ((), "(unset)"), ("x", "****"), ("0123456789abcde", "****"),
    ("0123456789abcdef", "****ef (16 chars)"),
])
def test_mask_of_a_rotation_pair_and_of_short_secrets(secret: str | tuple[str, ...],
                                                      shown: str) -> None:
    assert mask(secret) == shown


# -- tenants sharing a CallRail account --------------------------------------------------------

def _account_tenant(slug: str, company: str | None, account: str = "227799611") -> str:
    company_line = f'company_id = "{company}"\n' if company else ""
    return (f'[tenants.{slug}]\nrilla_api_key = "{slug}-rilla-key-000001"\n'
            f'[tenants.{slug}.callrail]\nsigning_key = "{slug}-signing-key-0001"\n'
            f'account_id = "{account}"\n{company_line}{AK}\n')


def test_tenants_sharing_an_account_each_name_their_company() -> None:
    tenants = parse_tenants(_account_tenant("acme", "COMacme") + _account_tenant("beta", "COMbeta")
                            + _account_tenant("solo", None, account="555"), env={})
    assert {t.callrail.company_id for t in tenants.values() if t.callrail} == {
        "COMacme", "COMbeta", None}


@pytest.mark.parametrize("companies", [(None, "COMbeta"), ("COMacme", None), (None, None)])
def test_a_shared_account_without_company_ids_is_refused(
        companies: tuple[str | None, str | None]) -> None:
    message = _error(_account_tenant("acme", companies[0]) + _account_tenant("beta", companies[1])
                     + _account_tenant("gamma", "COMgamma"), env={})
    missing = ", ".join(s for s, c in zip(("acme", "beta"), companies, strict=True) if c is None)
    assert message.startswith("tenants acme, beta, gamma share CallRail account 227799611, so "
                              "each must name its company_id")
    assert message.endswith(f"missing for: {missing} (without it reconciliation would copy one "
                            "tenant's calls into another's Rilla)")


def test_a_shared_account_with_the_same_company_twice_is_refused() -> None:
    message = _error(_account_tenant("acme", "COM1") + _account_tenant("beta", "COM1"), env={})
    assert message == ("tenants acme, beta share CallRail account 227799611 and name the same "
                       "company_id twice")


def test_a_company_on_different_accounts_is_not_shared() -> None:
    tenants = parse_tenants(_account_tenant("acme", "COM1", account="1")
                            + _account_tenant("beta", "COM1", account="2"), env={})
    assert set(tenants) == {"acme", "beta"}


# -- intake limit and recording hosts ----------------------------------------------------------

def test_intake_limit_and_recording_hosts_default_to_none() -> None:
    t = parse_tenants(f"[tenants.acme]\n{RK}", env={})["acme"]
    assert (t.intake_per_second, t.intake_mib_per_minute, t.recording_hosts) == (None, None, ())


def test_intake_limit_and_recording_hosts() -> None:
    t = parse_tenants(f"[tenants.acme]\n{RK}intake_per_second = 5\nintake_mib_per_minute = 0.5\n"
                      'recording_hosts = ["Media.Example.com ", "cdn.acme.example"]\n',
                      env={})["acme"]
    assert (t.intake_per_second, t.intake_mib_per_minute) == (5.0, 0.5)
    assert isinstance(t.intake_per_second, float)
    assert t.recording_hosts == ("media.example.com", "cdn.acme.example")


@pytest.mark.parametrize(("line", "word"), [
    ("intake_per_second = 0", "intake_per_second"),
    ("intake_per_second = -1", "intake_per_second"),
    ('intake_per_second = "5"', "intake_per_second"),
    ("intake_per_second = true", "intake_per_second"),
    ("intake_mib_per_minute = 0", "intake_mib_per_minute"),
    ('intake_mib_per_minute = "64"', "intake_mib_per_minute"),
    ('recording_hosts = "media.example.com"', "recording_hosts"),
    ('recording_hosts = [""]', "recording_hosts"),
    ("recording_hosts = [1]", "recording_hosts"),
])
def test_bad_intake_limit_or_recording_hosts_is_one_clear_error(line: str, word: str) -> None:
    message = _error(f"[tenants.acme]\n{RK}{line}\n", env={})
    assert message.startswith("tenant 'acme': ") and word in message
    assert "\n" not in message.strip()
