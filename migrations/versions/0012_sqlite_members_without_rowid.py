"""On SQLite, the members table becomes a WITHOUT ROWID table: one B-tree keyed by
(audience_id, user_id) instead of a rowid table plus the primary key's index.

Every member a run adds or removes was written to both trees, at a random page of the index
and (for a removal) of the table. An incremental run at 20M memberships (400,000 changes) spent
5.9-6.9 s of system time on it; without the rowid tree it took 13.5 s of CPU instead of 15.9 s
and 11.6 s instead of 13.5 s of wall time (medians of 3, interleaved, each state VACUUMed
first, docs/scale.md), and the VACUUMed file was 2.52 GB instead of 3.05 GB. PostgreSQL keeps
its heap and index: nothing changes there.

The upgrade copies the table once, in key order: 16.7 s for 20M rows. The file needs room for
the second copy and keeps its size afterwards (the freed pages are reused; VACUUM returns them).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rebuild(rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    suffix = "" if rowid else " WITHOUT ROWID"
    op.execute(
        "CREATE TABLE _sync_members_new (audience_id INTEGER NOT NULL, "
        "user_id VARCHAR(255) NOT NULL, value TEXT, "
        f"PRIMARY KEY (audience_id, user_id)){suffix}"
    )
    op.execute(
        "INSERT INTO _sync_members_new (audience_id, user_id, value) "
        "SELECT audience_id, user_id, value FROM sync_members ORDER BY audience_id, user_id"
    )
    op.execute("DROP TABLE sync_members")
    op.execute("ALTER TABLE _sync_members_new RENAME TO sync_members")


def upgrade() -> None:
    _rebuild(rowid=False)


def downgrade() -> None:
    _rebuild(rowid=True)
