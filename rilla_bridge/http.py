"""HTTP sessions for the outside APIs (Rilla, CallRail)."""

from __future__ import annotations

import os

import requests
from requests.adapters import HTTPAdapter


def http_session(base_url: str, *, pool_maxsize: int = 10) -> requests.Session:
    """A Session for one API host whose environment (proxy variables, netrc, CA bundle) is
    read once, here, instead of on every request: requests otherwise scans the environment
    and netrc per call, a large share of a worker's CPU per delivery."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0,
                          pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies = dict(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session
