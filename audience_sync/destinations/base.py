"""The interface every destination implements: take per-user updates, hand back per-user outcomes.

It is shaped for a remote, batched, failure-prone API. The engine hands a destination a lazy stream
of ``UserUpdate`` values; the destination pulls from it as capacity frees up and yields
``Outcome`` lists *as they are confirmed*. The engine commits each yielded list while later
requests are still in flight, so a killed run re-sends at most what was not yet recorded. A
``DestinationError`` is raised only when the whole run must stop (rejected credentials, spent
quota); outcomes already yielded stand.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from audience_sync.errors import DestinationError
from audience_sync.model import Outcome, UserUpdate

__all__ = ["Call", "Destination", "DestinationSettings", "IdentifyCall", "TrackEvent"]


class DestinationSettings(BaseModel):
    """Base of each destination's validated ``[destination]`` table (minus ``type``/``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_config(cls, table: Mapping[str, Any], env: Mapping[str, str]) -> Self:
        """Validate the ``[destination]`` table; a destination may apply environment overrides.

        Raises pydantic's ``ValidationError`` (the config loader turns it into a ``ConfigError``
        naming the file and key).
        """
        return cls.model_validate(dict(table))


class TrackEvent(BaseModel):
    """A Segment-spec Track call: an event for one user's event stream."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    event: str
    properties: dict[str, Any] = {}
    email: str | None = None


class IdentifyCall(BaseModel):
    """A Segment-spec Identify call: who a user is (``email``, ``name``...) and other traits."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    traits: dict[str, Any] = {}


#: A call sent outside an audience sync (``audience-sync track``).
Call = TrackEvent | IdentifyCall


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

    def stop(self) -> None:
        """A stop was asked for (SIGTERM): take no new users, let in-flight requests finish.

        The engine also stops feeding updates; a destination that queues updates ahead of
        sending them overrides this so the queued ones stay pending instead of being sent.
        """
        return None

    def preflight(self) -> None:
        """Check, without I/O, that the destination can run (e.g. credentials are set).

        Called before a run touches any state; raises a ``DestinationError`` subclass.
        """
        return None

    @abc.abstractmethod
    def deliver(self, updates: Iterable[UserUpdate]) -> AsyncGenerator[list[Outcome], None]:
        """Send ``updates`` (a lazy iterable: pull from it as capacity frees up) and yield
        outcomes as they are confirmed, one per update in total.

        An update that gets no outcome (the run was stopped) is treated as pending: not sent.
        """

    async def send_calls(self, calls: Sequence[Call]) -> list[Outcome]:
        """Send Identify and Track calls; one outcome per call, in order.

        Calls for the same user are sent in the order given (an Identify that creates a user
        before that user's Track). A Track for a user the destination does not know is
        ``skipped`` with the reason.
        """
        raise DestinationError(f"the {self.kind} destination does not accept Track calls")

    def describe_plan(self, updates: Sequence[UserUpdate]) -> dict[str, int]:
        """Estimated cost of sending ``updates`` (e.g. ``{"requests": n}``), for ``--dry-run``."""
        return {}
