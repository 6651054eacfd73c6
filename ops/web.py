"""The web process (Procfile ``web``): granian serving ``app.rsgi`` in worker processes.

    rilla-bridge web [--host 0.0.0.0]      # port: PORT; workers: WEB_CONCURRENCY

Why granian: it reads connections, headers and bodies in Rust, so a client that trickles its
request holds no worker (under gunicorn's sync workers four such clients stopped intake).
Headers must arrive within ``WEB_READ_TIMEOUT_SECONDS`` (granian's header read timeout), and
then the body within the same again (``app.rsgi``). On SIGTERM the workers stop accepting,
finish the requests they have (both deadlines bound them) and exit; a worker still busy after
``KILL_AFTER_SECONDS`` is killed, well before Heroku's SIGKILL 30 s after its SIGTERM.

Beside the workers it runs the operator process (``app.operator_process``), which answers
the console's pages and the admin API the workers hand it, so a page's rendering takes no GIL
from the webhooks; it is restarted when it crashes and stopped after the workers.

This main process imports neither Flask nor the app (which is why this module is not under
``app/``, whose ``__init__`` loads both): each worker builds its own (``app.rsgi:build``). It
only points prometheus_client's multiprocess mode at one directory for all workers, which works
only if prometheus_client is first imported after that, and sends granian's own log lines
through our JSON formatter and masking.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from rilla_bridge.observability import setup_logging
from rilla_bridge.settings import OPERATOR_SOCKET_ENV, Settings

log = logging.getLogger("rilla_bridge.web")

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


class OperatorProcess:
    """Runs ``python -m app.operator_process`` beside the workers, listening on a socket in a
    directory of its own (0700), and starts it again when it crashes. It holds the read end
    of a pipe whose write end only this process and its workers hold: when they are all gone
    (even by SIGKILL) it reads EOF and stops."""

    RESTART_SECONDS = 1.0

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="rilla-bridge-operator-")
        self.address = os.path.join(self.directory, "socket")
        self._read, self._write = os.pipe()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name="operator-watch", daemon=True).start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.operator_process", self.address, str(self._read)],
                pass_fds=(self._read,))

    def _watch(self) -> None:
        while True:
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set() or code in (0, -signal.SIGTERM):
                return   # stopped on purpose (the dyno's SIGTERM reaches every process)
            log.error("the operator process exited (%s); starting it again; meanwhile the "
                      "workers answer the console themselves", code)
            if self._stopping.wait(self.RESTART_SECONDS):
                return
            self._spawn()

    def stop(self) -> None:
        """After the workers: SIGTERM, then SIGKILL if it is still busy after
        ``KILL_AFTER_SECONDS``."""
        with self._lock:
            self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(KILL_AFTER_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self.directory, ignore_errors=True)


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

    operator = OperatorProcess()
    os.environ[OPERATOR_SOCKET_ENV] = operator.address
    operator.start()
    try:
        Server(**server_options(settings, host)).serve()
    finally:
        operator.stop()
