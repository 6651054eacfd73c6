"""The history database's tables (SQLAlchemy Core), as the migrations in ``migrations/`` create
them; a test checks that the two agree.

Times are epoch seconds (UTC) stored as double precision, the same numbers Redis, the records
and the command line use: no time zone conversions anywhere, and ``rilla_bridge.clock`` stays
the one clock. ``record`` / ``last_record`` / dead letter and audit ``id`` columns hold Redis
stream entry ids (``"1700000000000-0"``): they order the records and make re-applying one a
no-op (``writer.py``).

Every query the command line and the console run is served by an index below; the comment on
each says which query needs it.
"""

from __future__ import annotations

import sqlalchemy as sa

# Stable constraint and index names, so later migrations can refer to them on both databases.
metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

Time = sa.Double   # epoch seconds, UTC

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Text, primary_key=True),                 # our id, ev_...
    # Identity columns are nullable only because a step may be written before its
    # ``received`` record (batches applied out of order); ``received`` fills them in.
    sa.Column("tenant", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("kind", sa.Text),
    sa.Column("call_id", sa.Text),                             # the provider's call id
    sa.Column("received_at", Time),
    sa.Column("status", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_attempt_at", Time),
    sa.Column("last_attempt_at", Time),
    sa.Column("last_status", sa.Integer),
    sa.Column("next_attempt_at", Time),
    sa.Column("finished_at", Time),
    sa.Column("size", sa.Integer),
    sa.Column("sha256", sa.Text),
    sa.Column("lane", sa.Text),
    sa.Column("note", sa.Text),
    sa.Column("body", sa.LargeBinary),                         # NULL: lead events (never kept)
    sa.Column("last_payload", sa.Text),                        # JSON, as sent to Rilla
    sa.Column("customer_phone", sa.Text),                      # E.164 (search.e164)
    sa.Column("customer_name", sa.Text),
    sa.Column("rep_email", sa.Text),                           # lower case
    sa.Column("last_record", sa.Text),                         # stream id of the newest record
    # events list: newest first, by tenant / status / both (unfiltered: the overview's index
    # below, which leads with received_at)
    sa.Index(None, "tenant", "received_at"),
    sa.Index(None, "status", "received_at"),
    sa.Index(None, "tenant", "status", "received_at"),
    # searches: phone, rep, call (the call id leads: --call-id alone and "same call" both use it)
    sa.Index(None, "customer_phone", "received_at"),
    sa.Index(None, "rep_email", "received_at"),
    sa.Index(None, "call_id", "tenant", "source"),
    # retention
    sa.Index(None, "finished_at"),
    # the console's overview and per-minute chart: one index-only range scan of the last day
    sa.Index("ix_events_received_at_tenant_status", "received_at", "tenant", "status"),
    # the tenants page: the last webhook per source
    sa.Index("ix_events_tenant_source_received_at", "tenant", "source", "received_at"),
)

timeline = sa.Table(
    "timeline", metadata,
    # (record, idx): the stream entry and the entry's place in it; re-applying is a no-op.
    sa.Column("record", sa.Text, primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("event_id", sa.Text, sa.ForeignKey("events.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("t", Time, nullable=False),
    sa.Column("what", sa.Text, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Index(None, "event_id", "t"),                            # events show
)

calls = sa.Table(
    "calls", metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("call_id", sa.Text, primary_key=True),
    sa.Column("state", sa.JSON, nullable=False),               # the Redis call hash's fields
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Index(None, "updated_at"),                              # retention
)

_open = sa.text("handled_at IS NULL")
_handled = sa.text("handled_at IS NOT NULL")

dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.Text, primary_key=True),                # stream id of the dead record
    sa.Column("event_id", sa.Text, nullable=False),            # our event id (no FK: a dead
    sa.Column("tenant", sa.Text, nullable=False),              # letter is never deleted by a
    sa.Column("source", sa.Text, nullable=False),              # cascade)
    sa.Column("kind", sa.Text),
    sa.Column("call_id", sa.Text),
    sa.Column("rilla_event_id", sa.Text),
    sa.Column("reason_code", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("response_body", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_failure_at", Time),
    sa.Column("failed_at", Time, nullable=False),
    sa.Column("payload", sa.Text),                             # JSON, the last payload sent
    sa.Column("handled_at", Time),                             # NULL = open
    sa.Column("handled_how", sa.Text),                         # replayed | deleted
    sa.Column("handled_by", sa.Text),
    sa.Index(None, "event_id"),
    # open ones: grouped (tenant x reason x status) and listed by failure time
    # (failed_at last: a group's newest sample is one step down the index; migration 0002)
    sa.Index("ix_dead_letters_open_group", "tenant", "reason_code", "status_code", "failed_at",
             sqlite_where=_open, postgresql_where=_open),
    sa.Index("ix_dead_letters_open_failed_at", "failed_at",
             sqlite_where=_open, postgresql_where=_open),
    sa.Index("ix_dead_letters_handled_at", "handled_at",      # retention of handled ones
             sqlite_where=_handled, postgresql_where=_handled),
)

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("id", sa.Text, primary_key=True),                # stream id of the audit record
    sa.Column("at", Time, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("selection", sa.JSON),
    sa.Column("count", sa.Integer),
    sa.Column("detail", sa.Text),
    sa.Index(None, "at"),
)

# Bulk actions an operator planned in the console or the API (``rilla_bridge.jobs``): the web
# process writes the plan, the scheduler process runs a confirmed one at the bulk pace and
# writes its progress here, so no web request ever runs one.
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),                # job_<hex>
    sa.Column("action", sa.Text, nullable=False),              # replay | delete
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("selection", sa.JSON, nullable=False),           # {"ids": [...]} or a filter
    sa.Column("status", sa.Text, nullable=False),              # planned | queued | running |
    sa.Column("total", sa.Integer, nullable=False),            # done | cancelled | failed
    sa.Column("done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("processed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("note", sa.Text),
    sa.Column("cancel", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("runner", sa.Text),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("confirmed_at", Time),
    sa.Column("started_at", Time),
    sa.Column("heartbeat_at", Time),
    sa.Column("finished_at", Time),
    sa.Index(None, "status", "created_at"),                   # the runner's next job
    sa.Index(None, "created_at"),                             # the jobs list
)
