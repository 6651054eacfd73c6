"""``rilla-bridge web`` (``ops/web.py``): granian's settings, its log lines, and a main
process light enough for prometheus_client's multiprocess mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ops.web import KILL_AFTER_SECONDS, LOG_CONFIG, serve, server_options
from rilla_bridge.settings import ConfigError, Settings
from tests.system import ROOT


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)


def test_the_main_process_loads_neither_the_app_nor_prometheus_client() -> None:
    """PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is first imported; the
    workers import it (with the app) after the main process set it."""
    out = _python("import sys, ops.cli, ops.web, granian.server; "
                  "print(sorted(m for m in ('app', 'flask', 'prometheus_client') "
                  "if m in sys.modules))")
    assert out.stdout.strip() == "[]"


def test_serve_refuses_to_start_when_prometheus_client_is_loaded_already() -> None:
    import prometheus_client  # noqa: F401 - as if something had imported it before serve()

    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        serve("127.0.0.1")


def test_server_options_follow_the_settings() -> None:
    from granian.constants import HTTPModes, Interfaces

    options = server_options(Settings(port=8123, web_concurrency=3,
                                      web_read_timeout_seconds=7.5), "127.0.0.1")
    assert (options["target"], options["factory"]) == ("app.rsgi:build", True)
    assert options["interface"] == Interfaces.RSGI and options["http"] == HTTPModes.http1
    assert (options["address"], options["port"], options["workers"]) == ("127.0.0.1", 8123, 3)
    assert options["http1_settings"].header_read_timeout == 7500
    assert options["log_access"] is False and options["respawn_failed_workers"] is True
    assert options["backpressure"] >= 1024   # body tricklers wait in the app, each a slot
    # a stuck worker is killed well before Heroku's SIGKILL, 30 s after its SIGTERM
    assert options["workers_kill_timeout"] == KILL_AFTER_SECONDS
    assert 7.5 * 2 <= KILL_AFTER_SECONDS <= 20


def test_settings_read_the_web_variables() -> None:
    s = Settings.from_env({"WEB_CONCURRENCY": "3", "WEB_READ_TIMEOUT_SECONDS": "2.5"})
    assert (s.web_concurrency, s.web_read_timeout_seconds) == (3, 2.5)
    assert (Settings().web_concurrency, Settings().web_read_timeout_seconds) == (2, 10.0)
    for env in ({"WEB_CONCURRENCY": "0"}, {"WEB_READ_TIMEOUT_SECONDS": "0"},
                {"WEB_READ_TIMEOUT_SECONDS": "61"}, {"WEB_READ_TIMEOUT_SECONDS": "soon"}):
        with pytest.raises(ConfigError, match="WEB_"):
            Settings.from_env(env)


def test_granian_log_lines_are_json_and_masked() -> None:
    """granian's own lines (Rust and Python, logger ``_granian``) go through our formatter:
    one JSON object a line, a URL token masked; its access log stays silent."""
    code = f"""
import logging
from granian.log import LogLevels, configure_logging
configure_logging(LogLevels.info, {LOG_CONFIG!r}, True)
logging.getLogger("_granian").warning("Invalid request: POST /webhooks/callingly/a?token=s3cr3t")
logging.getLogger("_granian.serve").info("Started worker-1")
logging.getLogger("granian.access").info("GET /x?token=s3cr3t 200")
"""
    out = _python(code)
    assert out.stdout == ""
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(x["logger"], x["level"]) for x in lines] == [("_granian", "warning"),
                                                        ("_granian.serve", "info")]
    assert "s3cr3t" not in out.stderr and "token=[Filtered]" in lines[0]["msg"]
