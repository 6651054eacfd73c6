"""Drop the events index on received_at alone: ix_events_received_at_tenant_status leads with
received_at and serves the same scans, and each index is written again on every insert and
every status change of an event (status is indexed, so no update is HOT).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_events_received_at", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_received_at", "events", ["received_at"])
