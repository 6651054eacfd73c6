"""The history tables: events, timeline, calls, dead letters, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

OPEN = sa.text("handled_at IS NULL")
HANDLED = sa.text("handled_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("tenant", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("kind", sa.Text),
        sa.Column("call_id", sa.Text),
        sa.Column("received_at", sa.Double),
        sa.Column("status", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_attempt_at", sa.Double),
        sa.Column("last_attempt_at", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("next_attempt_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("size", sa.Integer),
        sa.Column("sha256", sa.Text),
        sa.Column("lane", sa.Text),
        sa.Column("note", sa.Text),
        sa.Column("body", sa.LargeBinary),
        sa.Column("last_payload", sa.Text),
        sa.Column("customer_phone", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("rep_email", sa.Text),
        sa.Column("last_record", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    for cols in (["received_at"], ["tenant", "received_at"], ["status", "received_at"],
                 ["tenant", "status", "received_at"], ["customer_phone", "received_at"],
                 ["rep_email", "received_at"], ["call_id", "tenant", "source"],
                 ["finished_at"]):
        op.create_index(f"ix_events_{'_'.join(cols)}", "events", cols)

    op.create_table(
        "timeline",
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("t", sa.Double, nullable=False),
        sa.Column("what", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("record", "idx", name="pk_timeline"),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], ondelete="CASCADE",
                                name="fk_timeline_event_id_events"),
    )
    op.create_index("ix_timeline_event_id_t", "timeline", ["event_id", "t"])

    op.create_table(
        "calls",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("call_id", sa.Text, nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "source", "call_id", name="pk_calls"),
    )
    op.create_index("ix_calls_updated_at", "calls", ["updated_at"])

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("kind", sa.Text),
        sa.Column("call_id", sa.Text),
        sa.Column("rilla_event_id", sa.Text),
        sa.Column("reason_code", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("response_body", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_failure_at", sa.Double),
        sa.Column("failed_at", sa.Double, nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("handled_at", sa.Double),
        sa.Column("handled_how", sa.Text),
        sa.Column("handled_by", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_event_id", "dead_letters", ["event_id"])
    op.create_index("ix_dead_letters_open_group", "dead_letters",
                    ["tenant", "reason_code", "status_code"],
                    sqlite_where=OPEN, postgresql_where=OPEN)
    op.create_index("ix_dead_letters_open_failed_at", "dead_letters", ["failed_at"],
                    sqlite_where=OPEN, postgresql_where=OPEN)
    op.create_index("ix_dead_letters_handled_at", "dead_letters", ["handled_at"],
                    sqlite_where=HANDLED, postgresql_where=HANDLED)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("selection", sa.JSON),
        sa.Column("count", sa.Integer),
        sa.Column("detail", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    for table in ("audit_log", "dead_letters", "calls", "timeline", "events"):
        op.drop_table(table)
