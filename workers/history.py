"""The history process (Procfile ``history``): drains the Redis stream of history records into
the SQL database, and runs retention.

One loop: read a batch with the consumer group (``XREADGROUP``), write it in one SQL
transaction (``rilla_bridge.history.writer.apply``: idempotent), then ``XACK`` + ``XDEL`` the
entries in one MULTI, then tell ``on_calls_written`` which call states SQL now holds (their
Redis copies may go). Entries stay pending in Redis until their batch is committed, so:

- the database down or slow: the same batch is tried again with a growing pause (5 s at
  most), one warning per outage; delivery is not affected (records wait in Redis);
- this process killed mid-batch: the entries are still pending; on start a copy re-reads its
  own, and any copy claims entries idle for ``CLAIM_IDLE_MS`` from one that died;
- a batch written but not acknowledged (Redis failed, or a crash in between): written again,
  which changes nothing.

Several copies may run (each reads its own entries; the writer tolerates batches applied out
of order), but one is enough, and SQLite wants a single writer anyway. SIGTERM stops it
between batches.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge import keys, leases
from rilla_bridge.clock import Clock
from rilla_bridge.history import db, retention, writer
from rilla_bridge.history.records import Record, seq
from rilla_bridge.history.writer import CallWritten
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

HISTORY, HISTORY_GROUP = keys.HISTORY, keys.HISTORY_GROUP
HISTORY_FAILED = "rb:history:failed"      # records the writer could not apply (kept, capped)
RETENTION_LEASE = "rb:history:retention"  # which copy runs retention this period

log = logging.getLogger("rilla_bridge.history")

# Errors after which the same batch is tried again later: the database unreachable or slow,
# or its schema not there yet (``db upgrade`` not run: PostgreSQL says ProgrammingError).
# Anything else is taken to be about the records themselves.
RETRY_LATER: tuple[type[Exception], ...] = (*db.UNAVAILABLE, sa.exc.ProgrammingError)
_SKIP_RETENTION: tuple[type[Exception], ...] = (redis.RedisError, *RETRY_LATER)

BLOCK_MS = 1000
# After a batch smaller than HISTORY_BATCH, wait this long before reading again, so that under
# load each transaction carries many records: per batch the database pays a transaction, a
# few statements and a commit, and Redis an acknowledgement, whatever its size. Measured at
# ~450 deliveries/s (bench.delivery, 2 cores): reading at once gave batches of ~5 records,
# and the history process spent 0.5 ms of CPU per event beside the workers; with this wait,
# 0.13 ms. It adds at most this much to the time from delivery to history row.
LINGER_SECONDS = 0.25
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
RETENTION_EVERY = 600.0
RETENTION_BUDGET = 3.0        # seconds of deleting per period at most: batches come first
CONSUMER_IDLE_MS = 3_600_000  # a consumer name unused this long, holding nothing, is dropped
LAG_LOG_EVERY = 60.0
FAILED_MAXLEN = 10_000


def _no_calls(_: list[CallWritten]) -> None:
    return None


def consumer_name() -> str:
    """A name that survives a restart of the same process: Heroku's ``DYNO`` (``history.1``)
    or the host name (stable for a Docker service and a machine), so a restarted copy reads
    the entries it held at once instead of waiting ``CLAIM_IDLE_MS`` to claim them. Two
    copies on one host share the name: harmless, ``>`` still hands each different entries
    and re-reading a pending batch writes nothing twice (the writer is idempotent)."""
    return os.environ.get("DYNO") or socket.gethostname()


class HistoryProcess:
    """The drain loop over ``client`` (Redis) and ``engine`` (SQL); tests drive ``step``."""

    def __init__(self, settings: Settings, client: redis.Redis, engine: Engine,
                 tenants: Mapping[str, Tenant], clock: Clock, *,
                 on_calls_written: Callable[[list[CallWritten]], object] = _no_calls,
                 consumer: str | None = None, batch: int | None = None,
                 block_ms: int | None = BLOCK_MS, claim_idle_ms: int = CLAIM_IDLE_MS,
                 retention_every: float = RETENTION_EVERY) -> None:
        self.settings = settings
        self.redis = client
        self.engine = engine
        self.tenants = tenants
        self.clock = clock
        self.on_calls_written = on_calls_written
        self.consumer = consumer or consumer_name()
        self.batch_size = batch or settings.history_batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retention_every = retention_every
        self.stopping = False
        self._scripts: Scripts | None = None
        self._group_ready = False
        self._own_pending = True       # first read this consumer's pending entries ("0")
        self._current: list[tuple[str, dict[Any, Any]]] = []   # read, not yet acknowledged
        self._written = False          # _current is in SQL, only the ack is missing
        self._calls: list[CallWritten] = []
        self._backoff = 0.0
        self._outage_since: float | None = None
        self._redis_down_since: float | None = None
        self._next_claim = 0.0
        self._next_retention = clock.now() + 5.0   # not in the first seconds of a deploy
        self._next_lag_log = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Until ``stop`` (SIGTERM/SIGINT in the process entry)."""
        log.info("history started", extra={"consumer": self.consumer,
                                           "database": db.describe(self.engine)})
        while not self.stopping:
            done = self.step()
            if 0 < done < self.batch_size:
                self._sleep(LINGER_SECONDS)
        log.info("history stopped", extra={"consumer": self.consumer})

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def step(self) -> int:
        """One round: read (or retry) a batch, write it, acknowledge it; run retention when
        due. Returns how many entries were written and acknowledged."""
        try:
            done = self._round()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return 0
        if self._redis_down_since is not None:
            log.info("Redis reachable again", extra={
                "down_seconds": round(self.clock.now() - self._redis_down_since, 1)})
            self._redis_down_since = None
            self._backoff = 0.0
        if not self._current:
            self._maybe_retention()
        return done

    def _round(self) -> int:
        self._ensure_group()
        if not self._current:
            self._current = self._read()
            self._written = False
            if not self._current:
                return 0
        if not self._written and not self._write():
            return 0
        return self._acknowledge()

    # -- Redis side -------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From the start of the stream: records added before the first history process
            # ran must be written too.
            self.redis.xgroup_create(HISTORY, HISTORY_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read(self) -> list[tuple[str, dict[Any, Any]]]:
        if self._own_pending:
            # Our own entries from before a restart under the same name (the host name is
            # stable on Docker and most hosts); the id "0" reads them, not new ones.
            entries = self._entries(self.redis.xreadgroup(
                HISTORY_GROUP, self.consumer, {HISTORY: "0"}, count=self.batch_size))
            if entries:
                return entries
            self._own_pending = False
        now = self.clock.now()
        if now >= self._next_claim:
            self._next_claim = now + CLAIM_EVERY
            claimed = self.redis.xautoclaim(HISTORY, HISTORY_GROUP, self.consumer,
                                            min_idle_time=self.claim_idle_ms, start_id="0-0",
                                            count=self.batch_size)
            entries = [(i, f) for i, f in _decode_entries(claimed[1]) if f]
            if entries:
                log.info("claimed history entries of a stopped copy",
                         extra={"count": len(entries)})
                return entries
        reply = self.redis.xreadgroup(HISTORY_GROUP, self.consumer, {HISTORY: ">"},
                                      count=self.batch_size, block=self.block_ms)
        return self._entries(reply)

    @staticmethod
    def _entries(reply: Any) -> list[tuple[str, dict[Any, Any]]]:
        out: list[tuple[str, dict[Any, Any]]] = []
        for _stream, items in reply or []:
            out += _decode_entries(items)
        return out

    def _acknowledge(self) -> int:
        ids = [i for i, _ in self._current]
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(HISTORY, HISTORY_GROUP, *ids)
            pipe.xdel(HISTORY, *ids)
            pipe.execute()
        self._current, self._written = [], False
        calls, self._calls = self._calls, []
        if calls:
            try:
                self.on_calls_written(calls)
            except Exception:
                # The Redis copies stay (with their TTL); nothing in history is missing.
                log.exception("on_calls_written failed", extra={"calls": len(calls)})
        self._log_lag(ids[-1])
        return len(ids)

    def _redis_failed(self, exc: redis.RedisError) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = self.clock.now()
            log.warning("Redis unavailable: history waits", extra={"error": repr(exc)})
        self._group_ready = False   # the stream may be gone (a Redis that lost its data)
        self._pause()

    # -- SQL side ---------------------------------------------------------------------------
    def _write(self) -> bool:
        """Write the current batch; False when the database could not take it (retry)."""
        records, bad = _parse(self._current)
        try:
            applied = self._apply(records)
        except RETRY_LATER as exc:
            self._database_failed(exc)
            return False
        except Exception:
            # Not an outage: some record makes the writer fail. Write the others one by one
            # and set the culprits aside in HISTORY_FAILED, so one bad record cannot stop
            # the history of everything behind it.
            log.exception("history batch failed; writing its records one by one")
            applied_calls: list[CallWritten] = []
            for record in records:
                try:
                    one = self._apply([record])
                    applied_calls += one.calls
                    bad += one.ignored
                except RETRY_LATER as exc:
                    self._database_failed(exc)
                    return False
                except Exception:
                    log.exception("history record set aside", extra={
                        "stream_id": record.stream_id, "type": record.type})
                    bad.append(record.stream_id)
            self._calls = applied_calls
        else:
            self._calls = applied.calls
            bad += applied.ignored
        if bad:
            self._set_aside(bad)
        if self._outage_since is not None:
            log.info("history database reachable again", extra={
                "database": db.describe(self.engine),
                "down_seconds": round(self.clock.now() - self._outage_since, 1)})
            self._outage_since = None
        self._backoff = 0.0
        self._written = True
        return True

    def _apply(self, records: Sequence[Record]) -> writer.Applied:
        with db.writing(self.engine) as conn:
            return writer.apply(conn, records, self.tenants)

    def _database_failed(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = self.clock.now()
            # Once per outage: the error class and first line only (a driver message may
            # quote the connection string; describe() masks the password).
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            log.warning("history database unavailable: records wait in Redis", extra={
                "database": db.describe(self.engine), "error": type(exc).__name__,
                "detail": first_line, "waiting": len(self._current)})
        self._pause()

    def _set_aside(self, stream_ids: list[str]) -> None:
        wanted = set(stream_ids)
        with self.redis.pipeline(transaction=False) as pipe:
            for sid, fields in self._current:
                if sid in wanted:
                    pipe.xadd(HISTORY_FAILED, {**fields, "id": sid}, maxlen=FAILED_MAXLEN,
                              approximate=True)
            pipe.execute()
        log.error("history records not understood, kept in %s", HISTORY_FAILED,
                  extra={"count": len(wanted), "first": stream_ids[0]})

    # -- housekeeping -----------------------------------------------------------------------
    def _pause(self) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        self._sleep(self._backoff)

    def _sleep(self, seconds: float) -> None:
        remaining = seconds
        while remaining > 0 and not self.stopping:   # SIGTERM ends a pause at once
            chunk = min(0.25, remaining)
            self.clock.sleep(chunk)
            remaining -= chunk

    def _maybe_retention(self) -> None:
        now = self.clock.now()
        if now < self._next_retention:
            return
        self._next_retention = now + self.retention_every
        try:
            self._forget_idle_consumers()
            if self._scripts is None:
                self._scripts = Scripts(self.redis)
            if not leases.take(self._scripts, self.clock, RETENTION_LEASE, self.consumer,
                               self.retention_every * 0.9):
                return
            deadline = now + RETENTION_BUDGET
            pruned = retention.prune(
                self.engine, now=now, retention_days=self.settings.history_retention_days,
                should_stop=lambda: self.stopping or self.clock.now() > deadline)
        except _SKIP_RETENTION as exc:
            log.warning("retention skipped", extra={"error": type(exc).__name__})
            return
        except Exception:
            log.exception("retention failed")
            return
        if pruned.events or pruned.dead_letters or pruned.calls:
            log.info("retention", extra={"events": pruned.events, "calls": pruned.calls,
                                         "dead_letters": pruned.dead_letters,
                                         "done": pruned.done})

    def _forget_idle_consumers(self) -> None:
        """Consumer names of copies long gone, holding no entries (a name per dyno start)."""
        for c in self.redis.xinfo_consumers(HISTORY, HISTORY_GROUP):
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if name != self.consumer and not c["pending"] and c["idle"] > CONSUMER_IDLE_MS:
                self.redis.xgroup_delconsumer(HISTORY, HISTORY_GROUP, name)

    def _log_lag(self, last_id: str) -> None:
        now = self.clock.now()
        if now < self._next_lag_log:
            return
        self._next_lag_log = now + LAG_LOG_EVERY
        lag = max(0.0, now - seq(last_id)[0] / 1000.0)
        try:
            backlog = int(self.redis.xlen(HISTORY))
        except redis.RedisError:
            backlog = -1
        log.info("history lag", extra={"lag_seconds": round(lag, 3), "backlog": backlog})


def _decode_entries(items: Any) -> list[tuple[str, dict[Any, Any]]]:
    out: list[tuple[str, dict[Any, Any]]] = []
    for entry_id, fields in items or []:
        sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append((sid, dict(fields or {})))
    return out


def _parse(entries: list[tuple[str, dict[Any, Any]]]) -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    bad: list[str] = []
    for sid, fields in entries:
        if not fields:
            continue   # deleted while pending: nothing to write
        try:
            records.append(Record.from_entry(sid, fields))
        except (ValueError, UnicodeDecodeError):
            bad.append(sid)
    return records, bad


def main() -> None:
    """The process entry (``rilla-bridge history``): everything from the environment."""
    from rilla_bridge.calls import CallState
    from rilla_bridge.clock import SystemClock
    from rilla_bridge.observability import init_sentry, setup_logging
    from rilla_bridge.redis_conn import make_redis, warn_unless_noeviction
    from rilla_bridge.scripts import Scripts
    from rilla_bridge.tenant_config import TenantsReloader, live_tenants

    settings = Settings.from_env()
    setup_logging()
    tenants = live_tenants(settings)
    init_sentry(settings.sentry_dsn, environment=settings.environment, component="history")
    client = make_redis(settings)
    warn_unless_noeviction(client, log)
    clock = SystemClock()
    calls = CallState(client, Scripts(client), clock, settings)
    # The call states now in SQL leave Redis (a later event of the call reloads them).
    process = HistoryProcess(settings, client, db.make_engine(settings), tenants, clock,
                             on_calls_written=calls.forget,
                             consumer=consumer_name())
    watcher = TenantsReloader(settings, tenants, clock, client=client, process="history").start()
    install_signals(process)
    process.run_forever()
    watcher.forget()


def install_signals(process: HistoryProcess) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        process.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
