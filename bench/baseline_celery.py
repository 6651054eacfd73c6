"""Bare delivery baseline: a Celery task that only POSTs a fixed appointment to the sandbox.

Same broker (Redis), pool and concurrency as the rilla-bridge worker under test, and the same
delivery-safety settings (acks late, prefetch 1) so that the gap measured is our pipeline's own
work (event store, call state and lock, transform, timeline), not Celery's. Started by
bench/delivery.py as ``celery -A bench.baseline_celery worker -Q bench_baseline -P gevent -c C``.
"""

from __future__ import annotations

import json
import os

import requests
from celery import Celery
from requests.adapters import HTTPAdapter

QUEUE = "bench_baseline"
TASK = "bench.baseline_deliver"
RILLA = os.environ.get("RILLA_BASE_URL", "http://127.0.0.1:8089").rstrip("/")
API_KEY = "acme-rilla-key-000001"
PAYLOAD = {
    "event_id": "callrail-CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264",
    "user_email": "mike.r@acme.example",
    "start_time": "2025-04-02 16:03:12", "end_time": "2025-04-02 16:08:24",
    "title": "Inbound call with Jordan Pike",
    "customer": {"id": "PER1f6a2d9c4b8e47a0b5c3e8d7f6a29b10", "name": "Jordan Pike",
                 "phone": "+17205550139", "address": "Lakewood, CO"},
    "lead_source": "Website Pool",
    "custom_fields": {"direction": "inbound", "duration": 312,
                      "tracking_number": "+13035550118", "tags": "new-customer, roof-repair",
                      "campaign": "Spring Promo", "answered": True},
    "media_url": "https://app.callrail.com/calls/CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264/recording/"
                 "redirect?access_key=5be0a9c1d27f43e8a6b4",
    "recording_type": "CALL_AUDIO",
}

app = Celery("bench_baseline", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
app.conf.update(
    task_acks_late=True, worker_prefetch_multiplier=1, task_serializer="json",
    accept_content=["json"], task_ignore_result=True, result_backend=None,
    task_default_queue=QUEUE, worker_hijack_root_logger=False, worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 60},
)
_session = requests.Session()
_session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=100, max_retries=0))


@app.task(name=TASK, acks_late=True)
def deliver(i: int) -> int:
    body = json.dumps({**PAYLOAD, "event_id": f"baseline-{i}"}, separators=(",", ":"))
    r = _session.post(f"{RILLA}/custom/appointment", data=body, timeout=(3.05, 20),
                      headers={"x-api-key": API_KEY, "Content-Type": "application/json",
                               "Accept": "application/json"})
    r.close()
    return r.status_code
