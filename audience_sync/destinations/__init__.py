"""Destinations, chosen by the config's ``[destination] type`` from a registry of names.

Each entry is imported only when used, so a destination's dependencies cost nothing to the
others.
"""

from __future__ import annotations

import importlib

from audience_sync.destinations.base import Destination, DestinationSettings, TrackEvent

__all__ = ["Destination", "DestinationSettings", "TrackEvent", "destination_class", "kinds"]

_REGISTRY: dict[str, str] = {
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
