"""The member cache: a fingerprint row names the columnar copy of the audience's members.

``sync_fingerprints.members_cache`` holds the BLAKE2b digest of a file (``state/membercache.py``)
holding exactly the members the state was left with by the run that recorded the row; a later
run whose snapshot changed reads the members from that file instead of the database, when a
file with those bytes is there. Nullable: adding it rewrites no table, and a row without it
means "no cache".

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sync_fingerprints", sa.Column("members_cache", sa.String(64)))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":  # SQLite 3.35+ drops a column in place
        op.execute("ALTER TABLE sync_fingerprints DROP COLUMN members_cache")
    else:
        op.drop_column("sync_fingerprints", "members_cache")
