"""Sessions read the environment once, when built, not on every request."""

from __future__ import annotations

import pytest

from rilla_bridge.http import http_session


def test_proxy_and_ca_bundle_from_the_environment_are_kept(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = http_session("https://crm.rillavoice.com")
    assert session.trust_env is False
    assert session.proxies.get("https") == "http://proxy.internal:3128"
    assert session.verify == "/etc/ssl/certs/ca-certificates.crt"


def test_no_proxy_for_the_host_means_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    session = http_session("http://127.0.0.1:8765")
    assert session.proxies == {}
    # An environment change after the session was built does not reach it.
    monkeypatch.delenv("NO_PROXY")
    assert session.proxies == {}
    assert session.merge_environment_settings(
        "http://127.0.0.1:8765/x", {}, None, None, None)["proxies"] == {}
