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
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.clock import Clock, SystemClock
from rilla_bridge.lifecycle import LATENCY_BUCKETS
from rilla_bridge.quota import QuotaGuard

WEBHOOKS = Counter(
    "rilla_bridge_webhooks_total", "Webhook requests by source, tenant and reply code",
    ["source", "tenant", "code"],
)
INTAKE_SECONDS = Histogram(
    "rilla_bridge_intake_seconds", "Time to answer a webhook request", ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class RedisStateCollector(Collector):
    """The system's state, read from Redis when scraped: queues, and per tenant what waits,
    runs and retries, and the age of its oldest unfinished event."""

    def __init__(self, client: redis.Redis, tenants: Iterable[str] = (),
                 clock: Clock | None = None, quota: QuotaGuard | None = None) -> None:
        self.redis = client
        self.tenants = set(tenants)
        self.clock = clock or SystemClock()
        self.quota = quota

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self.clock.now()
        up = _gauge("rilla_bridge_redis_up", "Redis answered the scrape")
        try:
            tenants = sorted(self.tenants | {_text(t) for t in
                                             self.redis.smembers(keys.TENANTS)})
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.llen(QUEUE_EVENTS)
                pipe.llen(QUEUE_CALLRAIL)
                pipe.hgetall(keys.STATS)
                pipe.smembers(keys.PAUSED)
                pipe.hgetall(keys.LAST_WEBHOOK)
                for t in tenants:
                    pipe.zcard(keys.open_events(t))
                    pipe.zrange(keys.open_events(t), 0, 0, withscores=True)
                    pipe.llen(keys.lane(t))
                    pipe.llen(keys.bulk_lane(t))
                    pipe.zcount(keys.inflight(t), int(now * 1000), "+inf")
                    pipe.zcard(keys.retry(t))
                    pipe.zcard(keys.bulk_retry(t))
                q_events, q_callrail, stats, paused, last_seen, *per = pipe.execute()
            try:
                memory = self.redis.info("memory")
            except redis.ResponseError:
                # INFO refused (renamed or denied on some hosted Redis): the memory gauges read
                # 0; every other gauge is still good.
                memory = {}
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        used = _gauge("rilla_bridge_redis_memory_used_bytes", "Redis used_memory")
        used.add_metric([], float(memory.get("used_memory", 0)))
        limit = _gauge("rilla_bridge_redis_memory_max_bytes",
                       "Redis maxmemory (0 = no limit): alert well before used reaches it")
        limit.add_metric([], float(memory.get("maxmemory", 0)))
        yield used
        yield limit
        depth = _gauge("rilla_bridge_queue_depth", "Messages waiting in a Celery queue",
                       ["queue"])
        depth.add_metric([QUEUE_EVENTS], q_events)
        depth.add_metric([QUEUE_CALLRAIL], q_callrail)
        yield depth
        oldest = _gauge("rilla_bridge_oldest_undelivered_seconds",
                        "Age of the tenant's oldest event not finished (queued, in flight, "
                        "retrying or waiting); 0 when none", ["tenant"])
        undelivered = _gauge("rilla_bridge_undelivered_events",
                             "Events received and not finished", ["tenant"])
        waiting = _gauge("rilla_bridge_waiting_events",
                         "Events waiting in the tenant's lanes for a slot or their turn",
                         ["tenant", "lane"])
        inflight = _gauge("rilla_bridge_in_flight", "Deliveries holding a slot", ["tenant"])
        retrying = _gauge("rilla_bridge_retry_scheduled", "Events waiting for a retry",
                          ["tenant"])
        paused_g = _gauge("rilla_bridge_tenant_paused", "1 while delivery is paused",
                          ["tenant"])
        paused_names = {_text(p) for p in paused}
        for i, t in enumerate(tenants):
            n, head, live, bulk, running, r_live, r_bulk = per[7 * i: 7 * i + 7]
            undelivered.add_metric([t], n)
            oldest.add_metric([t], max(0.0, now - head[0][1]) if head else 0.0)
            waiting.add_metric([t, "live"], live)
            waiting.add_metric([t, "bulk"], bulk)
            inflight.add_metric([t], running)
            retrying.add_metric([t], r_live + r_bulk)
            paused_g.add_metric([t], 1 if t in paused_names else 0)
        yield from (oldest, undelivered, waiting, inflight, retrying, paused_g)
        yield last_webhook(last_seen, set(tenants))
        yield from worker_counters(stats)
        if self.quota is not None:
            try:
                budget = list(callrail_budget(self.quota))
            except redis.RedisError:
                budget = []   # the other families are still good
            yield from budget


def last_webhook(last_seen: dict[Any, Any], tenants: set[str]) -> GaugeMetricFamily:
    """When each tenant's last webhook of each source was taken (``rb:last_webhook``, written
    by the intake script); a tenant silent for unusually long has a webhook switched off."""
    gauge = _gauge("rilla_bridge_last_webhook_timestamp_seconds",
                   "When the tenant's last webhook from this source was taken (Unix time)",
                   ["tenant", "source"])
    for (tenant, source), value in sorted(keys.last_webhook_times(last_seen).items()):
        if tenant in tenants:   # a tenant removed from the tenants file is no longer reported
            gauge.add_metric([tenant, source], value)
    return gauge


def callrail_budget(quota: QuotaGuard) -> Iterator[GaugeMetricFamily]:
    """Each CallRail account's requests used in the rolling hour and day against its limits
    (the quota guard's own count, shared by every process)."""
    used = _gauge("rilla_bridge_callrail_requests_used",
                  "CallRail API requests counted against the account in the rolling window",
                  ["account", "window"])
    limit = _gauge("rilla_bridge_callrail_requests_limit",
                   "CallRail API requests the account may make in the window",
                   ["account", "window"])
    for account in quota.accounts_known():
        status = quota.status(account)
        for window in ("hour", "day"):
            used.add_metric([account, window], float(status[f"{window}_used"]))
        limit.add_metric([account, "hour"], float(status["hourly_limit"]))
        limit.add_metric([account, "day"], float(status["daily_limit"]))
    yield used
    yield limit


def worker_counters(stats: dict[Any, Any]) -> Iterator[Any]:
    """The workers' counters in ``rb:stats`` (``lifecycle.stats_fields``) as Prometheus
    families: outcomes and Rilla's answers by tenant, and Rilla's answer time per tenant."""
    outcomes = CounterMetricFamily("rilla_bridge_outcomes",
                                   "Worker outcomes (delivered, retry_scheduled, dead_lettered, "
                                   "skipped, ...) by tenant", labels=["outcome", "tenant"])
    answers = CounterMetricFamily("rilla_bridge_rilla_responses",
                                  "Rilla's answers by status code ('none': no answer) and tenant",
                                  labels=["code", "tenant"])
    buckets: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for raw, value in sorted(stats.items()):
        kind, _, rest = _text(raw).partition("|")
        if kind == "outcome":
            outcome, _, tenant = rest.partition("|")
            outcomes.add_metric([outcome, tenant], float(value))
        elif kind == "rilla":
            code, _, tenant = rest.partition("|")
            answers.add_metric([code, tenant], float(value))
        elif kind == "latency":
            le, _, tenant = rest.partition("|")
            buckets.setdefault(tenant, {})[le] = float(value)
        elif kind == "latency_sum":
            sums[rest] = float(value)
    yield outcomes
    yield answers
    latency = HistogramMetricFamily("rilla_bridge_rilla_seconds",
                                    "Time Rilla took to answer a delivery, by tenant",
                                    labels=["tenant"])
    for tenant, counts in sorted(buckets.items()):
        running, cumulative = 0.0, []
        for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
            running += counts.get(le, 0.0)
            cumulative.append((le, running))
        latency.add_metric([tenant], cumulative, sums.get(tenant, 0.0))
    yield latency


def render(client: redis.Redis, tenants: Iterable[str] = (),
           quota: QuotaGuard | None = None) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    state = RedisStateCollector(client, tenants, quota=quota)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY  # single process (tests, flask run): the default registry
        data = generate_latest(registry) + generate_latest(_one(state))
        return data, CONTENT_TYPE_LATEST
    registry.register(state)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _one(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg
