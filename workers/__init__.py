"""Celery workers: ``workers.celery_app`` (the app), ``workers.tasks`` (thin adapters),
``workers.pipeline`` (what a delivery does), ``workers.scheduler`` (periodic work)."""
