"""The worker's Celery app (``workers/celery_app.py``): loss guards, logging, and the kombu
client reuse."""

from __future__ import annotations

import logging

from workers import celery_app


def test_loss_guards_are_set() -> None:
    conf = celery_app.app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_redirect_stdouts is False


def test_broker_pool_fits_a_gevent_pool_of_concurrent_acks() -> None:
    opts = celery_app.app.conf.broker_transport_options
    assert opts["max_connections"] >= 200 + 50   # Procfile worker -c up to 200, plus consumer
    with celery_app.app.connection_for_read() as conn:
        assert conn.default_channel.pool.max_connections == opts["max_connections"]


def test_per_task_lines_are_quiet_after_logging_setup() -> None:
    celery_app._json_logging(loglevel=logging.INFO)
    for name in celery_app.PER_TASK_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
