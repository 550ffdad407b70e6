"""The change log keeps one index, by (run_id, user_id), instead of one by user_id and one by
run_id.

Each logged change was also inserted into the index by user at a random leaf: a run's users are
spread over the whole log, so at 20M logged rows a run of 400,000 changes rewrote most of that
index's pages (SQLite: 4.6 s of CPU and 6.5-7.2 s of wall time for those inserts, against
0.8-1.1 s and 0.9-1.4 s with the one index by run, whose new entries all land at its end; on
PostgreSQL each touched page also goes to the WAL whole after a checkpoint). Lookups by run use
the new index's prefix; a user's history probes it once per run
(``StateStore.user_changes``), milliseconds for thousands of runs.

The upgrade builds the new index from the table once (18-20 s for 22.4M rows on SQLite).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sync_changes_run_user", "sync_changes", ["run_id", "user_id"])
    op.drop_index("ix_sync_changes_user", table_name="sync_changes")
    op.drop_index("ix_sync_changes_run", table_name="sync_changes")


def downgrade() -> None:
    op.create_index("ix_sync_changes_run", "sync_changes", ["run_id"])
    op.create_index("ix_sync_changes_user", "sync_changes", ["user_id"])
    op.drop_index("ix_sync_changes_run_user", table_name="sync_changes")
