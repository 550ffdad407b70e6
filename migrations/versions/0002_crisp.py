"""Crisp: the user_id -> people_id map and the per-day request counter.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "crisp_people",
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("people_id", sa.String(64)),
        sa.Column("email", sa.String(320)),
        sa.Column("profile_hash", sa.String(32)),
        sa.Column("updated_at", _ts, nullable=False),
    )
    op.create_table(
        "destination_requests",
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("destination_requests")
    op.drop_table("crisp_people")
