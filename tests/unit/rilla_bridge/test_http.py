"""Sessions and pools read the environment once, when built, not on every request."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest
import urllib3

from rilla_bridge.http import http_pool, http_session


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


def test_pool_takes_proxy_and_ca_bundle_once(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    pool = http_pool("https://crm.rillavoice.com", maxsize=7)
    assert isinstance(pool, urllib3.ProxyManager)
    assert pool.proxy is not None and pool.proxy.host == "proxy.internal"
    assert pool.connection_pool_kw["ca_certs"] == str(bundle)
    assert pool.connection_pool_kw["maxsize"] == 7
    assert pool.connection_pool_kw["retries"].total is False


def test_pool_without_proxy_verifies_with_certifi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "crm.rillavoice.com")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    pool = http_pool("https://crm.rillavoice.com")
    assert not isinstance(pool, urllib3.ProxyManager)
    assert pool.connection_pool_kw["ca_certs"] == certifi.where()
    assert pool.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"
    # A directory of certificates (as requests accepts) goes in as one.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs")
    assert http_pool("https://x.test").connection_pool_kw["ca_cert_dir"] == "/etc/ssl/certs"
