"""The change log drops its foreign key to sync_runs.

A foreign key makes PostgreSQL run a referential check per inserted row: half of the cost of
writing the change log (1.1 of 2.1 s for 400,000 rows, measured; see docs/scale.md). The log
is append-only and written only by the engine, for the run it is recording; `history prune`
deletes a run's changes together with the run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite keeps the foreign key unnamed; naming it by convention lets batch mode find it.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_SQLITE_FK = "fk_sync_changes_run_id_sync_runs"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("sync_changes", naming_convention=_NAMING) as batch:
            batch.drop_constraint(_SQLITE_FK, type_="foreignkey")
        return
    name = _foreign_key_name()
    if name is not None:
        op.drop_constraint(name, "sync_changes", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("sync_changes", naming_convention=_NAMING) as batch:
            batch.create_foreign_key(_SQLITE_FK, "sync_runs", ["run_id"], ["id"])
        return
    op.create_foreign_key(None, "sync_changes", "sync_runs", ["run_id"], ["id"])


def _foreign_key_name() -> str | None:
    for fk in sa.inspect(op.get_bind()).get_foreign_keys("sync_changes"):
        if fk["referred_table"] == "sync_runs":
            name: str | None = fk["name"]
            return name
    return None
