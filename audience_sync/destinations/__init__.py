"""Destinations, chosen by the config's ``[destination] type`` from a registry of names.

Each entry is imported only when used, so a destination's dependencies cost nothing to the
others.
"""

from __future__ import annotations

import importlib

from audience_sync.destinations.base import (
    Call,
    Destination,
    DestinationSettings,
    IdentifyCall,
    TrackEvent,
)

__all__ = [
    "Call",
    "Destination",
    "DestinationSettings",
    "IdentifyCall",
    "TrackEvent",
    "destination_class",
    "kinds",
]

_REGISTRY: dict[str, str] = {
    "crisp": "audience_sync.destinations.crisp:CrispDestination",
    "jsonl": "audience_sync.destinations.jsonl:JsonlDestination",
}


def kinds() -> list[str]:
    """The destination types a config may name."""
    return sorted(_REGISTRY)


def destination_class(kind: str) -> type[Destination]:
    """The class registered for ``kind``; ``KeyError`` when there is none."""
    module_name, _, attr = _REGISTRY[kind].partition(":")
    cls: type[Destination] = getattr(importlib.import_module(module_name), attr)
    return cls
