"""The settings of the repeated-401 throttle (``AUTH_FAILURES_PER_MINUTE``,
``TRUST_FORWARDED_FOR``)."""

from __future__ import annotations

import pytest

from rilla_bridge.settings import ConfigError, Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.auth_failures_per_minute == 20 and s.trust_forwarded_for is False


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), (" ", False),
])
def test_trust_forwarded_for(raw: str, expected: bool) -> None:
    assert Settings.from_env({"TRUST_FORWARDED_FOR": raw}).trust_forwarded_for is expected


@pytest.mark.parametrize(("env", "says"), [
    ({"TRUST_FORWARDED_FOR": "maybe"}, "TRUST_FORWARDED_FOR must be 1 or 0"),
    ({"AUTH_FAILURES_PER_MINUTE": "-1"}, "AUTH_FAILURES_PER_MINUTE must not be negative"),
    ({"AUTH_FAILURES_PER_MINUTE": "many"}, "AUTH_FAILURES_PER_MINUTE must be an integer"),
])
def test_bad_values_are_refused_with_the_reason(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env(env)
