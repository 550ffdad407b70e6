"""The composition root: the state database and the destination a command works with.

Every command that touches the state opens it here and closes it here: ``open_state`` for the
commands that only read or keep history (``history``, ``status``, ``serve``'s bookkeeping),
``resources`` for those that send (``sync``, ``retire``, ``track``), which also build the
configured destination. Before anything is sent, ``ready`` checks the destination can run and
brings the schema up to date (``[state] auto_migrate``) or makes sure it is current.

A destination is handed the database only when it keeps tables there (``uses_state``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa

from audience_sync.config import Config
from audience_sync.destinations import Destination, destination_class
from audience_sync.errors import StateError
from audience_sync.state import connect, schema_is_current, upgrade

__all__ = [
    "open_destination",
    "open_resources",
    "open_state",
    "prepare_schema",
    "prepared_state",
    "ready",
    "resources",
]


@contextlib.contextmanager
def open_state(url: str, *, create: bool = True, read_only: bool = False) -> Iterator[sa.Engine]:
    """The state database at ``url``, disposed of on leaving.

    ``create=False``: a SQLite file that does not exist is not created (an empty in-memory
    database stands in). ``read_only``: the database itself refuses every write.
    """
    engine = connect(url, create=create, read_only=read_only)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def prepared_state(config: Config) -> Iterator[sa.Engine]:
    """The config's state database, its schema brought up to date (or checked)."""
    with open_state(config.state.url) as engine:
        prepare_schema(config, engine)
        yield engine


def open_destination(config: Config, state: sa.Engine | None) -> Destination:
    """The configured destination, ready to be entered (``async with``); it gets ``state``
    only when it keeps tables in the state database."""
    cls = destination_class(config.destination.type)
    return cls(
        config.destination.settings,
        name=config.destination.name,
        state=state if cls.uses_state else None,
        config_dir=config.config_dir,
    )


def open_resources(
    config: Config, destination: Destination | None = None, *, create: bool = True
) -> tuple[sa.Engine, Destination]:
    """The state database (the caller disposes of it) and the configured destination, or
    ``destination`` in its place (tests inject one). Prefer ``resources``, which closes."""
    engine = connect(config.state.url, create=create)
    try:
        return engine, destination or open_destination(config, engine)
    except BaseException:
        engine.dispose()
        raise


@contextlib.contextmanager
def resources(
    config: Config, destination: Destination | None = None, *, create: bool = True
) -> Iterator[tuple[sa.Engine, Destination]]:
    """``open_resources``, with the state database disposed of on leaving."""
    engine, dest = open_resources(config, destination, create=create)
    try:
        yield engine, dest
    finally:
        engine.dispose()


def prepare_schema(config: Config, engine: sa.Engine) -> None:
    """Migrate the state schema (``auto_migrate``) or make sure it is current."""
    if config.state.auto_migrate:
        upgrade(engine)
    elif not schema_is_current(engine):
        raise StateError(
            "the state database is not at the current schema version; "
            "run `audience-sync db upgrade` (or set [state] auto_migrate = true)"
        )


def ready(
    config: Config, engine: sa.Engine, dest: Destination, *, schema_checked: bool = False
) -> None:
    """Check the destination can run, then bring the state's schema up to date (or check it).

    ``schema_checked``: the caller did already (``serve``, once at start and on reload).
    """
    dest.preflight()  # e.g. missing credentials: one clear error, before any state change
    if not schema_checked:
        prepare_schema(config, engine)
