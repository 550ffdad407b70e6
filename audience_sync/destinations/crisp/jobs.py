"""The units of work of Crisp's delivery (``delivery.py``): the jobs its workers take from the
queue (a user's whole sequence, a user's data update alone, a ``PATCH /batch/data`` for many
users), a batch group being filled, and what a delivery uses of its destination (``Host``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from audience_sync.destinations.budget import RequestBudget
from audience_sync.destinations.crisp.client import CrispClient
from audience_sync.destinations.crisp.payloads import DataValue
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.destinations.crisp.profiles import UserSequence
from audience_sync.destinations.crisp.settings import CrispSettings
from audience_sync.model import Outcome, UserUpdate

__all__ = [
    "BatchJob",
    "DataJob",
    "Group",
    "GroupKey",
    "Host",
    "Job",
    "Member",
    "StopAsked",
    "UserJob",
    "as_outcome",
    "job_size",
]

#: A batch group's key: the custom data its members share, sorted.
GroupKey = tuple[tuple[str, DataValue], ...]


class Host(Protocol):
    """What a delivery uses of its destination (``CrispDestination``): its settings, client,
    budget and people map, and where a batch refusal is noted and remembered."""

    name: str
    settings: CrispSettings
    client: CrispClient | None
    budget: RequestBudget
    people: PeopleMap
    batch_refused: str | None

    async def remember(self, fact: str, value: bool, detail: str) -> None: ...


def as_outcome(result: Person | Outcome, user_id: str) -> Outcome:
    """A user's outcome from what its sequence ended with: an ``Outcome``, or the ``Person``
    it reached (delivered)."""
    return result if isinstance(result, Outcome) else Outcome.delivered(user_id)


class StopAsked(Exception):
    """The engine asked the run to stop (a signal): it ends, the rest stays pending."""

    def __str__(self) -> str:
        return "stop asked for"


@dataclass(slots=True)
class UserJob:
    """A user whose profile may need creating, resolving or updating first."""

    update: UserUpdate
    person: Person | None
    cost: int = 0
    """Requests the user is expected to cost (reserved from the day's budget when started)."""


@dataclass(slots=True)
class DataJob:
    """A known profile: its data update, continuing the user's sequence (a batch fallback)."""

    update: UserUpdate
    seq: UserSequence
    cost: int = 1


Member = tuple[UserUpdate, UserSequence]


@dataclass(slots=True)
class BatchJob:
    """Users whose custom data is identical and whose people_id is known: one
    ``PATCH /batch/data`` for all of them."""

    data: GroupKey
    members: list[Member]
    cost: int = 1


Job = UserJob | DataJob | BatchJob


@dataclass(slots=True)
class Group:
    """A batch being filled: sent when full, after ``batch_linger``, or when no user can join."""

    started: float
    members: list[Member] = field(default_factory=list)


def job_size(job: Job) -> int:
    """Users a job settles."""
    return len(job.members) if isinstance(job, BatchJob) else 1
