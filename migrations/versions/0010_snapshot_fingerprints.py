"""Snapshot fingerprints: a run whose snapshot is unchanged since the state matched it skips
the diff.

``sync_fingerprints`` keeps, per audience (so per destination), the fingerprint of the snapshot
of its last run that left the state exactly equal to that snapshot; any run of the audience
deletes it as it starts. ``sync_runs.unchanged_since`` names, for a run that skipped the diff,
the run whose state it found unchanged (nullable: adding it rewrites no table).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_fingerprints",
        sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("snapshot_rows", sa.Integer, nullable=False),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("snapshot_at", sa.DateTime(timezone=True)),
        sa.Column("mtime", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("sync_runs", sa.Column("unchanged_since", sa.Integer))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":  # SQLite 3.35+ drops a column in place
        op.execute("ALTER TABLE sync_runs DROP COLUMN unchanged_since")
    else:
        op.drop_column("sync_runs", "unchanged_since")
    op.drop_table("sync_fingerprints")
