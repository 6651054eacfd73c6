"""gunicorn settings for the web process (Procfile ``web``)."""

import os
import tempfile

from rilla_bridge.settings import Settings

_settings = Settings.from_env()

# Every worker writes its metrics here; /metrics adds them up (prometheus_client multiprocess).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rilla-bridge-metrics-")

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
worker_class = "sync"
timeout = 30
graceful_timeout = 20
keepalive = 2
accesslog = None          # our own log line per request never carries the query string (token)
control_socket_disable = True
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
