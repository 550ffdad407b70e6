"""Computed traits: a sync's kind, a member's value, and values in the retry queue and log.

An audience is a computed trait whose value is ``true`` for members, so both share the tables:
``sync_audiences.kind`` says which one a key is; a trait's last confirmed value per user is kept
in ``sync_members.value`` as canonical JSON (NULL for an audience's members); the retry queue
keeps the value to send in ``sync_pending.data``; the change log keeps a trait's value before
and after in ``sync_changes.old_value`` / ``new_value``. All new columns are nullable, so on
PostgreSQL adding them rewrites no table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on every backend: SQLite takes one with a constant default, and its
    # batch mode (copy and drop the table) would fail on the tables referring to this one.
    op.add_column(
        "sync_audiences",
        sa.Column("kind", sa.String(16), nullable=False, server_default="audience"),
    )
    op.add_column("sync_members", sa.Column("value", sa.Text))
    op.add_column("sync_pending", sa.Column("data", sa.Text))
    op.add_column("sync_changes", sa.Column("old_value", sa.Text))
    op.add_column("sync_changes", sa.Column("new_value", sa.Text))


def downgrade() -> None:
    for table, column in (
        ("sync_changes", "new_value"),
        ("sync_changes", "old_value"),
        ("sync_pending", "data"),
        ("sync_members", "value"),
        ("sync_audiences", "kind"),
    ):
        if op.get_bind().dialect.name == "sqlite":  # SQLite 3.35+ drops a column in place
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        else:
            op.drop_column(table, column)
