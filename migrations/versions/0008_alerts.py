"""Alerts raised and not yet cleared: one row per (destination, audience, condition).

An alert is sent only by the process whose insert of its row succeeds, so however many
processes (cron runs, `serve` replicas) see the same failure, one alert goes out; the row is
deleted when the condition clears (a run succeeds, a late run starts).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_alerts",
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("audience_key", sa.String(200), primary_key=True),
        sa.Column("condition", sa.String(40), primary_key=True),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.Integer),
        sa.Column("message", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_alerts")
