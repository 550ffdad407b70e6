"""Destinations, chosen by the config's ``[destination] type`` from a registry of names.

Each entry is imported only when used, so a destination's dependencies cost nothing to the
others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from audience_sync.destinations.base import (
    Call,
    Destination,
    DestinationSettings,
    IdentifyCall,
    TrackEvent,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = [
    "Call",
    "Destination",
    "DestinationSettings",
    "IdentifyCall",
    "TrackEvent",
    "destination_class",
    "kinds",
    "table_metadata",
]

_REGISTRY: dict[str, str] = {
    "crisp": "audience_sync.destinations.crisp:CrispDestination",
    "jsonl": "audience_sync.destinations.jsonl:JsonlDestination",
}

#: The modules declaring tables that destinations keep in the state database (a ``metadata``
#: each). The Alembic migrations create them along with the state's own tables.
_TABLES = ("audience_sync.destinations.budget", "audience_sync.destinations.crisp.tables")


def kinds() -> list[str]:
    """The destination types a config may name."""
    return sorted(_REGISTRY)


def destination_class(kind: str) -> type[Destination]:
    """The class registered for ``kind``; ``KeyError`` when there is none."""
    module_name, _, attr = _REGISTRY[kind].partition(":")
    cls: type[Destination] = getattr(importlib.import_module(module_name), attr)
    return cls


def table_metadata() -> list[sa.MetaData]:
    """The metadata of every table a destination keeps in the state database."""
    return [importlib.import_module(name).metadata for name in _TABLES]
