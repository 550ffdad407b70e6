"""The tables the Crisp destination keeps in the state database, in its own ``metadata``.

The Alembic migrations (0002, 0007) create them with the state's tables; ``people.py`` and
``facts.py`` read and write them. Its request counts are the generic ``destination_requests``
(``destinations/budget.py``).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["crisp_facts", "crisp_people", "metadata"]

metadata = sa.MetaData()
_ts = sa.DateTime(timezone=True)

# Who each user is in Crisp: the people_id Crisp returned (or the email that addresses the
# profile when only that is known), so a steady-state update is one request with no lookup.
crisp_people = sa.Table(
    "crisp_people",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("people_id", sa.String(64)),
    sa.Column("email", sa.String(320)),
    sa.Column("profile_hash", sa.String(32)),
    sa.Column("updated_at", _ts, nullable=False),
)

# What the Crisp destination learned about the API it talks to (``facts.py``): whether an email
# addresses a profile, whether /batch/data is refused. ``config`` fingerprints the destination
# settings the fact was learned under: a changed config forgets it.
crisp_facts = sa.Table(
    "crisp_facts",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("fact", sa.String(64), primary_key=True),
    sa.Column("value", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("config", sa.String(32), nullable=False),
    sa.Column("learned_at", _ts, nullable=False),
)
