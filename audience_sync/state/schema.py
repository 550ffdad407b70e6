"""The state tables, as SQLAlchemy Core metadata (the migrations in ``migrations/`` create them).

A destination that keeps rows of its own declares its tables in its own module and ``metadata``
(``destinations.table_metadata()`` lists them); the same migrations create them.

Audiences are numbered per destination in ``sync_audiences`` so the large tables
(``sync_members``, ``sync_changes``) carry a small integer instead of two strings per row.
Only current members are stored: a user who left is deleted, not flagged. A computed trait is
stored the same way, its members being the users who have a value (``sync_members.value``).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "metadata",
    "sync_alerts",
    "sync_audiences",
    "sync_changes",
    "sync_fingerprints",
    "sync_locks",
    "sync_members",
    "sync_pending",
    "sync_rejected_rows",
    "sync_runs",
]

metadata = sa.MetaData()
_ts = sa.DateTime(timezone=True)

sync_audiences = sa.Table(
    "sync_audiences",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("destination", sa.String(200), nullable=False),
    sa.Column("audience_key", sa.String(200), nullable=False),
    sa.Column("audience_name", sa.String(500), nullable=False),
    sa.Column("created_at", _ts, nullable=False),
    # "audience" or "trait" (a computed trait): both kinds share one key namespace.
    sa.Column("kind", sa.String(16), nullable=False, server_default="audience"),
    sa.UniqueConstraint("destination", "audience_key", name="uq_sync_audiences_destination_key"),
)

sync_members = sa.Table(
    "sync_members",
    metadata,
    # No foreign key: PostgreSQL would check it once per inserted member (migration 0005).
    sa.Column("audience_id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    # A computed trait's last confirmed value, as canonical JSON; NULL for an audience member.
    sa.Column("value", sa.Text),
    # On SQLite one B-tree by the key, not a rowid table plus its index (migration 0012).
    sqlite_with_rowid=False,
)

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), nullable=False),
    sa.Column("destination", sa.String(200), nullable=False),
    sa.Column("audience_key", sa.String(200), nullable=False),
    sa.Column("audience_name", sa.String(500), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", _ts, nullable=False),
    sa.Column("finished_at", _ts),
    sa.Column("snapshot_rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rejected_rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("entered", sa.Integer, nullable=False, server_default="0"),
    sa.Column("exited", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delivered", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pending", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    # A run that skipped the diff: the run whose state its snapshot is unchanged since.
    sa.Column("unchanged_since", sa.Integer),
    sa.Index("ix_sync_runs_audience_started", "audience_id", "started_at"),
)

sync_pending = sa.Table(
    "sync_pending",
    metadata,
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("value", sa.Boolean, nullable=False),
    # A computed trait's value to send (canonical JSON, "null" for a clear); NULL for audiences.
    sa.Column("data", sa.Text),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("status_code", sa.Integer),
    sa.Column("retryable", sa.Boolean, nullable=False),
    sa.Column("input_hash", sa.String(32), nullable=False),
    sa.Column("message_id", sa.String(36), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("first_run_id", sa.Integer, nullable=False),
    sa.Column("last_run_id", sa.Integer, nullable=False),
    sa.Column("first_at", _ts, nullable=False),
    sa.Column("last_at", _ts, nullable=False),
)

sync_changes = sa.Table(
    "sync_changes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    # No foreign key to sync_runs: a per-row referential check doubles the cost of writing
    # the log (migration 0003).
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("trait_key", sa.String(200), nullable=False),
    sa.Column("value", sa.Boolean, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("at", _ts, nullable=False),
    # A computed trait's value before and after the change (canonical JSON; NULL: none);
    # ``value`` then says whether the user has a value after it. NULL for audiences.
    sa.Column("old_value", sa.Text),
    sa.Column("new_value", sa.Text),
    # One index, by run then user: a run's rows all go to its end, where an index by user alone
    # took a random leaf per row (migration 0013). A user's history probes it once per run.
    sa.Index("ix_sync_changes_run_user", "run_id", "user_id"),
)

# Snapshot rows a run rejected (the first ``MAX_STORED_ROWS`` per audience and run; the
# run's ``rejected_rows`` counts them all). No foreign key, as ``sync_changes``.
sync_rejected_rows = sa.Table(
    "sync_rejected_rows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, nullable=False, index=True),
    sa.Column("audience_key", sa.String(200), nullable=False),
    sa.Column("row_number", sa.Integer),
    sa.Column("user_id", sa.String(255)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", _ts, nullable=False),
)

sync_locks = sa.Table(
    "sync_locks",
    metadata,
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
    sa.Column("run_id", sa.Integer),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("acquired_at", _ts, nullable=False),
    sa.Column("expires_at", _ts, nullable=False),
)

#: Alerts raised and not cleared: at most one per (destination, audience, condition); the
#: process whose insert succeeds sends it (``alerts.py``).
sync_alerts = sa.Table(
    "sync_alerts",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("audience_key", sa.String(200), primary_key=True),
    sa.Column("condition", sa.String(40), primary_key=True),
    sa.Column("raised_at", _ts, nullable=False),
    sa.Column("run_id", sa.Integer),
    sa.Column("message", sa.Text, nullable=False),
)

#: The fingerprint of the snapshot (``sources/fingerprint.py``) of each audience's last run
#: that left the state exactly equal to its snapshot; deleted when any run of the audience
#: starts (``state/fingerprints.py``); and the member cache's file that holds those members.
sync_fingerprints = sa.Table(
    "sync_fingerprints",
    metadata,
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("sync_audiences.id"), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("snapshot_rows", sa.Integer, nullable=False),
    sa.Column("members", sa.Integer, nullable=False),
    # The snapshot's time when it came from a `snapshot_at` column (NULL: the file's mtime).
    sa.Column("snapshot_at", _ts),
    sa.Column("mtime", _ts, nullable=False),
    sa.Column("recorded_at", _ts, nullable=False),
    # The digest of the file holding exactly these members (``state/membercache.py``; NULL:
    # none was written).
    sa.Column("members_cache", sa.String(64)),
)
