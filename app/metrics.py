"""Prometheus metrics for the web process, correct across several worker processes.

``rilla-bridge web`` (``ops/web.py``) sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker
imports prometheus_client, so every worker writes its own mmap files and /metrics adds them
up. Only counters and histograms live there: a gauge would need its dead workers' files
marked (prometheus_client's ``mark_process_dead``), which granian has no hook for.
System-wide gauges (queue depth, dead letters, delivery counters written by the workers) are
read from Redis at scrape time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS

WEBHOOKS = Counter(
    "rilla_bridge_webhooks_total", "Webhook requests by source, tenant and reply code",
    ["source", "tenant", "code"],
)
INTAKE_SECONDS = Histogram(
    "rilla_bridge_intake_seconds", "Time to answer a webhook request", ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


class RedisStateCollector(Collector):
    """Backlog, dead letters and worker counters, read from Redis when scraped."""

    def __init__(self, client: redis.Redis, tenants: Iterable[str] = ()) -> None:
        self.redis = client
        self.tenants = sorted(tenants)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.llen(QUEUE_EVENTS)
                pipe.llen(QUEUE_CALLRAIL)
                pipe.zcard(keys.PENDING)
                pipe.zrange(keys.PENDING, 0, 0, withscores=True)
                pipe.zcard(keys.RETRY)
                pipe.zcard(keys.DLQ_INDEX)
                pipe.hgetall(keys.STATS)
                for tenant in self.tenants:
                    pipe.zcard(keys.cap_wait(tenant))
                q_events, q_callrail, pending, oldest, retry, dlq, stats, *waiting = (
                    pipe.execute())
        except redis.RedisError:
            up = GaugeMetricFamily("rilla_bridge_redis_up", "Redis answered the scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("rilla_bridge_redis_up", "Redis answered the scrape")
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("rilla_bridge_queue_depth", "Messages waiting", labels=["queue"])
        depth.add_metric([QUEUE_EVENTS], q_events)
        depth.add_metric([QUEUE_CALLRAIL], q_callrail)
        yield depth
        g = GaugeMetricFamily("rilla_bridge_pending_events", "Events received, not finished")
        g.add_metric([], pending)
        yield g
        age = GaugeMetricFamily("rilla_bridge_oldest_pending_seconds",
                                "Age of the oldest unfinished event")
        age.add_metric([], max(0.0, time.time() - oldest[0][1]) if oldest else 0.0)
        yield age
        g = GaugeMetricFamily("rilla_bridge_retry_scheduled", "Events waiting for a retry")
        g.add_metric([], retry)
        yield g
        g = GaugeMetricFamily("rilla_bridge_dead_letters", "Events in the dead-letter store")
        g.add_metric([], dlq)
        yield g
        g = GaugeMetricFamily("rilla_bridge_waiting_for_slot",
                              "Events waiting for a slot under their tenant's in-flight cap",
                              labels=["tenant"])
        for tenant, count in zip(self.tenants, waiting, strict=True):
            g.add_metric([tenant], count)
        yield g
        outcomes = CounterMetricFamily("rilla_bridge_outcomes", "Worker outcomes since start",
                                       labels=["outcome"])
        for name, value in sorted(stats.items()):
            outcomes.add_metric([name.decode()], float(value))
        yield outcomes


def render(client: redis.Redis, tenants: Iterable[str] = ()) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY  # single process (tests, flask run): the default registry
        data = generate_latest(registry) + generate_latest(
            _one(RedisStateCollector(client, tenants)))
        return data, CONTENT_TYPE_LATEST
    registry.register(RedisStateCollector(client, tenants))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _one(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg
