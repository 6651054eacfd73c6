"""Celery tasks: thin adapters that hand over to plain functions."""

from __future__ import annotations

from typing import Any

from workers import callrail_jobs, pipeline
from workers.celery_app import app
from workers.runtime import runtime


@app.task(name="rilla_bridge.process_event", acks_late=True)
def process_event(event_id: str, tenant: str) -> str:
    """Deliver one dispatched event (a stale or repeated copy of the message does nothing)."""
    return pipeline.process_event(runtime(), event_id, tenant)


@app.task(name="rilla_bridge.callrail_job", acks_late=True)
def callrail_job(job: dict[str, Any]) -> str:
    """Run one CallRail API request whose quota token the scheduler already granted."""
    return callrail_jobs.run(runtime(), job)
