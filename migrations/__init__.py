"""Alembic scripts for the state database (shipped as ``audience_sync.migrations``)."""
