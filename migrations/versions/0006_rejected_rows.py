"""Rejected snapshot rows are kept: sync_rejected_rows, one row per rejected row of a run.

Until now they were printed once and lost. Each run stores its first rows (see
``state.store.MAX_STORED_ROWS``) with their row number, user_id (control characters escaped)
and reason; ``history RUN_ID`` and ``history --rejected`` list them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_rejected_rows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("audience_key", sa.String(200), nullable=False),
        sa.Column("row_number", sa.Integer),
        sa.Column("user_id", sa.String(255)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sync_rejected_rows_run_id", "sync_rejected_rows", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_sync_rejected_rows_run_id", table_name="sync_rejected_rows")
    op.drop_table("sync_rejected_rows")
