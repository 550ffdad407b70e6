"""The interface every destination implements: take per-user updates, hand back per-user outcomes.

It is shaped for a remote, batched, failure-prone API. The engine gives a destination a chunk of
``UserUpdate`` values; the destination yields ``Outcome`` lists *as they are confirmed* (so the
engine can commit state while later requests are still in flight), and raises a
``DestinationError`` only when the whole run must stop (rejected credentials, spent quota).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from audience_sync.errors import DestinationError
from audience_sync.model import Outcome, UserUpdate

__all__ = ["Destination", "DestinationSettings", "TrackEvent"]


class DestinationSettings(BaseModel):
    """Base of each destination's validated ``[destination]`` table (minus ``type``/``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackEvent(BaseModel):
    """A Segment-spec Track call: an event for one user's event stream."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    event: str
    properties: dict[str, Any] = {}
    email: str | None = None


class Destination(abc.ABC):
    """A place audience memberships are delivered to.

    Subclasses set ``kind`` (the ``type`` in the config) and ``settings_model``. A destination is
    an async context manager: resources (files, HTTP clients) are opened in ``__aenter__`` and
    closed in ``__aexit__``.
    """

    kind: ClassVar[str]
    settings_model: ClassVar[type[DestinationSettings]]

    def __init__(
        self, settings: DestinationSettings, *, name: str, state: sa.Engine, config_dir: Path
    ) -> None:
        self.settings = settings
        self.name = name
        self.state = state
        self.config_dir = config_dir

    @classmethod
    def default_name(cls, settings: DestinationSettings) -> str:
        """The destination's identity in the state tables when the config gives no ``name``.

        State is kept per destination name, so a second destination starts with its own
        initial sync.
        """
        return cls.kind

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    @abc.abstractmethod
    def deliver(self, updates: Iterable[UserUpdate]) -> AsyncIterator[list[Outcome]]:
        """Send ``updates`` (a lazy iterable: pull from it as capacity frees up) and yield
        outcomes as they are confirmed, one per update in total.

        An update that gets no outcome (the run was stopped) is treated as pending: not sent.
        """

    async def track(self, events: Sequence[TrackEvent]) -> list[Outcome]:
        """Add events to users' event streams; one outcome per event, in order."""
        raise DestinationError(f"the {self.kind} destination does not accept Track calls")

    def describe_plan(self, updates: Sequence[UserUpdate]) -> dict[str, int]:
        """Estimated cost of sending ``updates`` (e.g. ``{"requests": n}``), for ``--dry-run``."""
        return {}
