"""State, run history, change log and run locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_audiences",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(200), nullable=False),
        sa.Column("audience_key", sa.String(200), nullable=False),
        sa.Column("audience_name", sa.String(500), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.UniqueConstraint(
            "destination", "audience_key", name="uq_sync_audiences_destination_key"
        ),
    )
    op.create_table(
        "sync_members",
        sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
        sa.Column("user_id", sa.String(255), primary_key=True),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), nullable=False),
        sa.Column("destination", sa.String(200), nullable=False),
        sa.Column("audience_key", sa.String(200), nullable=False),
        sa.Column("audience_name", sa.String(500), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", _ts, nullable=False),
        sa.Column("finished_at", _ts),
        *(
            sa.Column(name, sa.Integer, nullable=False, server_default="0")
            for name in (
                "snapshot_rows",
                "rejected_rows",
                "entered",
                "exited",
                "unchanged",
                "delivered",
                "failed",
                "skipped",
                "pending",
            )
        ),
        sa.Column("error", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
    )
    op.create_index("ix_sync_runs_audience_started", "sync_runs", ["audience_id", "started_at"])
    op.create_table(
        "sync_pending",
        sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("value", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("status_code", sa.Integer),
        sa.Column("retryable", sa.Boolean, nullable=False),
        sa.Column("input_hash", sa.String(32), nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_run_id", sa.Integer, nullable=False),
        sa.Column("last_run_id", sa.Integer, nullable=False),
        sa.Column("first_at", _ts, nullable=False),
        sa.Column("last_at", _ts, nullable=False),
    )
    op.create_table(
        "sync_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("sync_runs.id"), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("trait_key", sa.String(200), nullable=False),
        sa.Column("value", sa.Boolean, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("at", _ts, nullable=False),
    )
    op.create_index("ix_sync_changes_user", "sync_changes", ["user_id"])
    op.create_index("ix_sync_changes_run", "sync_changes", ["run_id"])
    op.create_table(
        "sync_locks",
        sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
        sa.Column("run_id", sa.Integer),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("acquired_at", _ts, nullable=False),
        sa.Column("expires_at", _ts, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "sync_locks",
        "sync_changes",
        "sync_pending",
        "sync_runs",
        "sync_members",
        "sync_audiences",
    ):
        op.drop_table(table)
