"""Retention: finished history older than ``HISTORY_RETENTION_DAYS`` is deleted in small
batches (one short transaction each, so the history writer is never held up for long).

What goes, oldest first:
- events finished before the cutoff, with their timelines (the foreign key cascades) and
  their handled dead letters; an event that still has an open dead letter is never deleted;
- events never finished, received more than twice the retention ago (abandoned: a live
  event is retried for a day at most), under the same rule;
- dead letters handled before the cutoff;
- call states last updated before the cutoff (a call that old gets no more events; if one
  comes, the worker starts it afresh, as Redis would after its TTL).
The audit log is kept: it grows with operator actions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.history.db import writing
from rilla_bridge.history.models import calls, dead_letters, events

BATCH = 1000
DAY = 86400.0


@dataclass
class Pruned:
    events: int = 0
    dead_letters: int = 0
    calls: int = 0
    batches: int = 0
    done: bool = True   # False: stopped early (``should_stop`` or ``max_batches``)


def _no_open_dead_letter() -> sa.ColumnElement[bool]:
    return ~sa.exists().where(dead_letters.c.event_id == events.c.id,
                              dead_letters.c.handled_at.is_(None))


def prune(engine: Engine, *, now: float, retention_days: float, batch: int = BATCH,
          max_batches: int | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> Pruned:
    """Delete what retention lets go, ``batch`` rows per transaction, until nothing is left
    (or ``max_batches`` transactions ran, or ``should_stop`` says so)."""
    cutoff = now - retention_days * DAY
    out = Pruned()
    passes: list[Callable[[], int]] = [
        lambda: _events(engine, events.c.finished_at < cutoff, batch, out),
        lambda: _events(engine, sa.and_(events.c.finished_at.is_(None),
                                        events.c.received_at < now - 2 * retention_days * DAY),
                        batch, out),
        lambda: _delete(engine, dead_letters, dead_letters.c.id,
                        dead_letters.c.handled_at < cutoff, batch),
        lambda: _delete(engine, calls, calls.c.call_id, calls.c.updated_at < cutoff, batch,
                        key=(calls.c.tenant, calls.c.source, calls.c.call_id)),
    ]
    counters = ["events", "events", "dead_letters", "calls"]
    for run, counter in zip(passes, counters, strict=True):
        while True:
            if should_stop() or (max_batches is not None and out.batches >= max_batches):
                out.done = False
                return out
            n = run()
            out.batches += 1
            setattr(out, counter, getattr(out, counter) + n)
            if n < batch:
                break
    return out


def _events(engine: Engine, condition: sa.ColumnElement[bool], batch: int, out: Pruned) -> int:
    chosen = (sa.select(events.c.id).where(condition, _no_open_dead_letter())
              .order_by(events.c.id).limit(batch).scalar_subquery())
    with writing(engine) as conn:
        # The open-dead-letter rule is checked again in the DELETE itself: the writer may
        # have added one since the SELECT (PostgreSQL, read committed).
        ids = list(conn.execute(events.delete().where(events.c.id.in_(chosen),
                                                      _no_open_dead_letter())
                                .returning(events.c.id)).scalars())
        if ids:
            gone = conn.execute(dead_letters.delete().where(
                dead_letters.c.event_id.in_(ids), dead_letters.c.handled_at.is_not(None)))
            out.dead_letters += gone.rowcount
    return len(ids)


def _delete(engine: Engine, table: sa.Table, column: sa.Column[str],
            condition: sa.ColumnElement[bool], batch: int,
            key: tuple[sa.Column[str], ...] | None = None) -> int:
    key = key or (column,)
    chosen = sa.select(*key).where(condition).limit(batch)
    with writing(engine) as conn:
        rows = conn.execute(chosen).all()
        if not rows:
            return 0
        if len(key) == 1:
            match: sa.ColumnElement[bool] = key[0].in_([r[0] for r in rows])
        else:
            match = sa.tuple_(*key).in_([tuple(r) for r in rows])
        return int(conn.execute(table.delete().where(match, condition)).rowcount)
