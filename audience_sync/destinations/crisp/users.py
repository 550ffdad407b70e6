"""Crisp's delivery, per user: what each user the engine hands over needs, and running it.

Where it sits: ``delivery.Delivery``'s intake hands each user to ``_route``, which settles it
at once (nothing to send, or no email to create a profile with), puts it in a batch group
(``batching.py``: its data update is all it needs), or queues a ``UserJob``. A worker runs the
job here (``_user``): the user's request sequence (create or resolve the profile, update it,
its data, its audience events) by ``profiles.py``, after which, with batching, a resolved user
joins a batch group for its data. ``_cost`` is what the scheduler reserves from the day's
budget for a user. ``PerUser`` is the part of ``Delivery`` that does this; the state it uses is
``Delivery``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audience_sync.destinations.crisp.jobs import (
    DataJob,
    Group,
    GroupKey,
    Job,
    StopAsked,
    UserJob,
    as_outcome,
)
from audience_sync.destinations.crisp.payloads import DataValue, audience_event
from audience_sync.destinations.crisp.people import Person
from audience_sync.destinations.crisp.profiles import EMAIL_REQUIRED, Profiles, Step, UserSequence
from audience_sync.destinations.crisp.settings import CrispSettings
from audience_sync.errors import QuotaExhausted
from audience_sync.model import Outcome, UserUpdate

__all__ = ["PerUser"]


class PerUser:
    """Routing, costing and running each user (a part of ``delivery.Delivery``)."""

    settings: CrispSettings
    profiles: Profiles
    stopping: QuotaExhausted | StopAsked | None
    user_jobs: int
    running: dict[int, tuple[Job, UserSequence | None]]
    groups: dict[GroupKey, Group]
    batching: bool

    if TYPE_CHECKING:  # Delivery's and Batching's (declared only for the type checker, so
        # these never shadow the real methods in Delivery's method resolution order)

        def _queue(self, job: Job) -> None: ...
        def _emit(self, outcome: Outcome) -> None: ...
        def _settle(self, users: int) -> None: ...
        def _group(self, update: UserUpdate, seq: UserSequence) -> None: ...

    def _route(self, update: UserUpdate, person: Person | None) -> None:
        """Settle a user who needs no request (or cannot have one: no email to create a profile),
        group one who can join a batch, else queue a user job."""
        if self.stopping is not None:
            self._settle(1)  # stays pending
            return
        if person is None or person.address is None:
            if not update.identity.email:
                if not update.sets_data:
                    # Leaving audiences on a profile Crisp never had: nothing to unset.
                    self._emit(Outcome.delivered(update.user_id))
                else:
                    self._emit(Outcome.skipped(update.user_id, EMAIL_REQUIRED))
                return
        elif self._batchable(update, person):
            self._group(
                update,
                UserSequence(
                    update.user_id,
                    update.identity,
                    person,
                    data=self._custom_data(update),
                    sets=update.sets_data,
                ),
            )
            return
        self.user_jobs += 1
        self._queue(UserJob(update, person))

    def _cost(self, update: UserUpdate, person: Person | None) -> int:
        """Requests a user is expected to cost: create or search, profile update, data, events
        (with batching, the data goes in a batch paid for separately)."""
        if person is None or person.address is None:
            cost = 1  # create (with the card)
        else:
            cost = int(self.profiles.needs_update(update.identity, person))
            if person.people_id is None and self.profiles.email_addressing is False:
                cost += 1  # search
        if not self.batching or tuple(sorted(self._custom_data(update).items())) not in self.groups:
            cost += 1  # the data update, or the batch of a group not open yet
        if self.settings.audience_events:
            cost += sum(not c.computed for c in update.changes)
        return cost

    def _custom_data(self, update: UserUpdate) -> dict[str, DataValue]:
        """The user's custom data to ``PATCH``: a computed trait's clear as ``clear_with`` says."""
        clear: DataValue = "" if self.settings.clear_with == "empty" else None
        return {k: clear if v is None else v for k, v in update.traits.items()}

    def _batchable(self, update: UserUpdate, person: Person) -> bool:
        """Whether the user needs nothing but its data update, by people_id (so it can join a
        batch)."""
        return (
            self.batching
            and person.people_id is not None
            and not self.profiles.needs_update(update.identity, person)
        )

    async def _user(self, job: UserJob) -> None:
        """Run a user's sequence (with batching, up to its data update). A user resolved to a
        people_id then joins a batch group for its data, or, if batching was turned off
        meanwhile (a refusal), sends its data now."""
        update = job.update
        named = (self.settings.entered_event, self.settings.exited_event)
        events = (
            [audience_event(c, *named) for c in update.changes if not c.computed]
            if self.settings.audience_events
            else []
        )
        seq = UserSequence(
            update.user_id,
            update.identity,
            job.person,
            data=self._custom_data(update),
            events=events,
            sets=update.sets_data,
            stop_before_data=self.batching,
        )
        self.running[id(job)] = (job, seq)
        found = await self.profiles.run(seq)
        if isinstance(found, Outcome):
            self._emit(found)
            return
        if self.batching:
            self._group(update, seq)
            return
        self._emit(as_outcome(await self.profiles.run(seq, Step.SET_DATA), update.user_id))

    async def _data(self, job: DataJob) -> None:
        """A user's own data update, after its batch could not be sent."""
        self._emit(as_outcome(await self.profiles.run(job.seq, Step.SET_DATA), job.update.user_id))
