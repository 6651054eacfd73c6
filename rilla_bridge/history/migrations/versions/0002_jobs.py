"""Bulk jobs of the on-call console and admin API (planned, confirmed, run by the scheduler).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


OPEN = sa.text("handled_at IS NULL")


def upgrade() -> None:
    # open dead letters by group, newest last: the console's group sample is one index step
    op.drop_index("ix_dead_letters_open_group", table_name="dead_letters")
    op.create_index("ix_dead_letters_open_group", "dead_letters",
                    ["tenant", "reason_code", "status_code", "failed_at"],
                    sqlite_where=OPEN, postgresql_where=OPEN)
    # the console's overview and per-minute chart read the last day from this index alone
    op.create_index("ix_events_received_at_tenant_status", "events",
                    ["received_at", "tenant", "status"])
    # the tenants page: each tenant's last webhook per source
    op.create_index("ix_events_tenant_source_received_at", "events",
                    ["tenant", "source", "received_at"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("selection", sa.JSON, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("processed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("note", sa.Text),
        sa.Column("cancel", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("runner", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("confirmed_at", sa.Double),
        sa.Column("started_at", sa.Double),
        sa.Column("heartbeat_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_open_group", table_name="dead_letters")
    op.create_index("ix_dead_letters_open_group", "dead_letters",
                    ["tenant", "reason_code", "status_code"],
                    sqlite_where=OPEN, postgresql_where=OPEN)
    op.drop_table("jobs")
    op.drop_index("ix_events_received_at_tenant_status", table_name="events")
    op.drop_index("ix_events_tenant_source_received_at", table_name="events")
