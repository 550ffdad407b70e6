"""The interface every destination implements, in one of two shapes.

- ``deliver``, per user, for a remote, batched, failure-prone API: the engine hands the
  destination a lazy stream of ``UserUpdate`` values; the destination pulls from it as capacity
  frees up and yields ``Outcome`` lists *as they are confirmed*, each user delivered, failed or
  skipped on their own.
- ``deliver_batches``, in columns, for a destination that takes many changes at once and confirms
  them all together (a file, a bulk load): the engine hands it ``ChangeBatch``es (Arrow tables)
  and it yields each batch back once all of it is confirmed. No Python object per change: at
  hundreds of thousands of changes that is most of a run's cost.

Either way the engine commits what was confirmed while later work is still in flight, so a
killed run re-sends at most what was not yet recorded. A ``DestinationError`` is raised only
when the whole run must stop (rejected credentials, spent quota, a full disk); what was already
confirmed stands.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from audience_sync.errors import DestinationError
from audience_sync.model import ChangeBatch, Outcome, UserUpdate

if TYPE_CHECKING:  # the config names a destination class without loading SQLAlchemy
    import sqlalchemy as sa

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

    @property
    def request_budget(self) -> int | None:
        """Requests per UTC day the destination may make (counted in ``destinations/budget.py``),
        or ``None`` when it has no daily budget."""
        return None


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

    Subclasses set ``kind`` (the ``type`` in the config) and ``settings_model``, and implement
    ``deliver`` or ``deliver_batches`` (and then set ``takes_batches``). What a destination can
    do is declared in class attributes, never inferred from which methods it overrides. A
    destination is an async context manager: resources (files, HTTP clients) are opened in
    ``__aenter__`` and closed in ``__aexit__``.
    """

    kind: ClassVar[str]
    settings_model: ClassVar[type[DestinationSettings]]
    uses_state: ClassVar[bool] = False
    """Whether the destination keeps tables of its own in the state database (Crisp: its
    request budget and people map); only such a destination is given the database."""
    takes_batches: ClassVar[bool] = False
    """Whether the destination implements ``deliver_batches``: the engine then hands it
    ``ChangeBatch``es, and ``deliver`` sends per-user updates through it."""
    prices_plans: ClassVar[bool] = False
    """Whether ``describe_plan`` estimates a cost: only then does a dry run collect the users
    that would change to price them."""

    def __init__(
        self,
        settings: DestinationSettings,
        *,
        name: str,
        config_dir: Path,
        state: sa.Engine | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self._state = state
        self.config_dir = config_dir

    @property
    def state(self) -> sa.Engine:
        """The state database, for a destination that keeps tables there (``uses_state``)."""
        if self._state is None:
            raise TypeError(f"{type(self).__name__} was given no state database")
        return self._state

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

    async def probe(self) -> str:
        """Check, at the least cost and sending no change, that a run could deliver here (a
        file destination: its folder is writable; an API: one request that needs the
        credentials). Returns what was found; raises a ``DestinationError`` subclass.

        Used by ``audience-sync check``; called outside ``async with``.
        """
        return "nothing to check"

    @property
    def batch_users(self) -> int:
        """Users per ``ChangeBatch`` handed to ``deliver_batches``."""
        return 5000

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncGenerator[list[Outcome], None]:
        """Send ``updates`` (a lazy iterable: pull from it as capacity frees up) and yield
        outcomes as they are confirmed, one per update in total.

        An update that gets no outcome (the run was stopped) is treated as pending: not sent.
        A destination that implements only ``deliver_batches`` gets this for free: updates go
        out in batches of ``batch_users`` and every user of a confirmed batch is delivered.
        """
        if not self.takes_batches:
            raise NotImplementedError(f"{type(self).__name__} implements no deliver method")
        iterator = iter(updates)
        while True:
            pending = list(itertools.islice(iterator, self.batch_users))
            if not pending:
                return
            sent = ChangeBatch.from_updates(pending)
            async for confirmed in self.deliver_batches([sent]):
                users = dict.fromkeys(confirmed.table.column("user_id").to_pylist())
                yield [Outcome.delivered(u) for u in users]

    def deliver_batches(self, batches: Iterable[ChangeBatch]) -> AsyncGenerator[ChangeBatch, None]:
        """Send ``batches`` (a lazy iterable) and yield each one back once every change in it is
        confirmed, in order; raise ``DestinationError`` when one cannot be.

        For destinations that confirm many changes at once and never refuse a single user.
        A batch that is not yielded (the run was stopped, or failed) stays pending: not sent.
        """
        raise NotImplementedError(f"{type(self).__name__} does not take change batches")

    async def send_calls(self, calls: Sequence[Call]) -> list[Outcome]:
        """Send Identify and Track calls; one outcome per call, in order.

        Calls for the same user are sent in the order given (an Identify that creates a user
        before that user's Track). A Track for a user the destination does not know is
        ``skipped`` with the reason.
        """
        raise DestinationError(f"the {self.kind} destination does not accept Track calls")

    def previous_sync(self) -> str | None:
        """What shows that this destination was synced before, or None (nothing does).

        The engine refuses a large initial sync from a state that holds nothing for a
        destination that says yes (``[safeguards] max_initial_sync``): the state was lost.
        """
        return None

    def describe_plan(self, updates: Sequence[UserUpdate]) -> dict[str, int]:
        """Estimated cost of sending ``updates`` (e.g. ``{"requests": n}``), for ``--dry-run``;
        called only when ``prices_plans`` is set."""
        return {}
