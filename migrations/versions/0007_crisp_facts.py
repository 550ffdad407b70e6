"""Crisp: what the destination learned about the API, remembered across runs.

``crisp_facts`` holds one row per (destination, fact): whether Crisp accepts an email in place
of a people_id (learned from a 404 on a route addressed by email), and whether it refuses
``PATCH /batch/data``. Without it every run paid again to find out, and the first one looped.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "crisp_facts",
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("fact", sa.String(64), primary_key=True),
        sa.Column("value", sa.Boolean, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("config", sa.String(32), nullable=False),
        sa.Column("learned_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("crisp_facts")
