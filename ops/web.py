"""The web process (Procfile ``web``): granian serving ``app.rsgi`` in worker processes.

    rilla-bridge web [--host 0.0.0.0]      # port: PORT; workers: WEB_CONCURRENCY

Why granian: it reads connections, headers and bodies in Rust, so a client that trickles its
request holds no worker (under gunicorn's sync workers four such clients stopped intake).
Headers must arrive within ``WEB_READ_TIMEOUT_SECONDS`` (granian's header read timeout), and
then the body within the same again (``app.rsgi``). On SIGTERM the workers stop accepting,
finish the requests they have (both deadlines bound them) and exit; a worker still busy after
``KILL_AFTER_SECONDS`` is killed, well before Heroku's SIGKILL 30 s after its SIGTERM.

This main process imports neither Flask nor the app (which is why this module is not under
``app/``, whose ``__init__`` loads both): each worker builds its own (``app.rsgi:build``). It
only points prometheus_client's multiprocess mode at one directory for all workers, which works
only if prometheus_client is first imported after that, and sends granian's own log lines
through our JSON formatter and masking.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from rilla_bridge.observability import setup_logging
from rilla_bridge.settings import Settings

TARGET = "app.rsgi:build"
KILL_AFTER_SECONDS = 15
BACKPRESSURE = 2048
# Request line plus headers: a webhook's are well under 2 KiB; more is refused with a 4xx.
MAX_HEAD_BYTES = 16 * 1024
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "rilla_bridge.observability.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                            "stream": "ext://sys.stderr"}},
    "loggers": {
        # granian's own lines (Rust and Python) in our format, masked like every other line
        "_granian": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        # its access log stays off: our request line never carries the query string (token)
        "granian.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
    },
}


def server_options(settings: Settings, host: str) -> dict[str, Any]:
    """granian's settings for the web process (also used by tests and benchmarks)."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    return {
        "target": TARGET, "factory": True, "interface": Interfaces.RSGI,
        "address": host, "port": settings.port, "workers": settings.web_concurrency,
        "http": HTTPModes.http1, "websockets": False,
        # requests in the app at once per worker, most of them waiting for a trickled body
        # (a coroutine each, cheap); past this granian stops handing requests over
        "backpressure": BACKPRESSURE,
        "http1_settings": HTTP1Settings(
            header_read_timeout=int(settings.web_read_timeout_seconds * 1000),
            max_buffer_size=MAX_HEAD_BYTES),
        "log_dictconfig": LOG_CONFIG, "log_access": False,
        "respawn_failed_workers": True, "workers_kill_timeout": KILL_AFTER_SECONDS,
    }


def serve(host: str) -> None:
    """Run the web process until SIGTERM or SIGINT."""
    # Every worker writes its metrics here and /metrics adds them up (counters and histograms
    # only, so a dead worker's files stay and keep counting: nothing to clean up when one
    # exits). prometheus_client picks its mode when first imported: in the workers, after this.
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                           "was set: the workers' metrics would not add up")
    settings = Settings.from_env()
    setup_logging()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rilla-bridge-metrics-")
    from granian.server import Server

    Server(**server_options(settings, host)).serve()
