"""Celery workers and the scheduler: ``celery_app`` (the app), ``tasks`` (thin adapters),
``runtime`` (every service a task needs), ``pipeline`` (what a delivery does),
``recordings`` (CallRail recording lookups), ``callrail_jobs`` (CallRail API work behind the
quota) and ``scheduler`` (periodic work)."""
