"""Values that flow between the stages: a loaded snapshot, the per-user updates the engine hands
to a destination, and the per-user outcomes the destination hands back.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # pandas and pyarrow load when a run needs them, not for `--help` or `status`
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "IDENTITY_TRAITS",
    "MAX_REJECTED_ROWS",
    "RESERVED_TRAIT_KEYS",
    "Change",
    "ChangeBatch",
    "DeliveryStatus",
    "Identity",
    "Outcome",
    "RejectedRow",
    "RunMode",
    "RunStatus",
    "Snapshot",
    "SyncKind",
    "TraitValue",
    "Trigger",
    "UserUpdate",
    "input_hash",
    "trait_json",
]

#: A computed trait's value as sent: what JSON (and Crisp's custom data) holds. ``None`` in a
#: ``Change`` is a clear: the user no longer has a value.
TraitValue = bool | int | float | str

#: Optional snapshot columns that describe who a user is (Crisp needs ``email`` to create one).
IDENTITY_TRAITS: tuple[str, ...] = ("email", "name", "phone", "avatar")
#: Rejected snapshot rows kept with their details per audience and run (all are counted); the
#: run stores these in ``sync_rejected_rows``.
MAX_REJECTED_ROWS = 1000
#: Trait keys an audience may not use: they would overwrite who the user is in a destination
#: (the identity traits, the user's id, and the name parts Crisp reads as the name).
RESERVED_TRAIT_KEYS: frozenset[str] = frozenset(
    (*IDENTITY_TRAITS, "user_id", "userId", "first_name", "last_name", "firstName", "lastName")
)


class RunMode(enum.StrEnum):
    INITIAL = "initial"
    INCREMENTAL = "incremental"
    FULL = "full"
    RETIRE = "retire"
    """``false`` to every member of an audience no longer configured, then its state dropped."""


class SyncKind(enum.StrEnum):
    """What a configured sync keeps in step: an audience's membership or a computed trait's value.

    An audience is a computed trait whose value is ``true`` for members and ``false`` once they
    leave; both share the pipeline, the state tables and one trait-key namespace.
    """

    AUDIENCE = "audience"
    TRAIT = "trait"


class Trigger(enum.StrEnum):
    MANUAL = "manual"
    SCHEDULE = "schedule"


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class DeliveryStatus(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A snapshot row that was not used, with its 1-based data row number and why."""

    row: int
    user_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One audience's validated membership.

    ``members`` is indexed by ``user_id`` (unique, text) with the identity columns that the
    source provided (a subset of ``IDENTITY_TRAITS``, nullable strings); for a computed trait
    also ``value``, the user's value as canonical JSON text (users without a value are not
    members). Planning (``planning.load_and_plan``, in memory or pushed down into the database)
    returns the snapshot with no member rows: the plan keeps those it sends (``Plan.sent``).
    ``held`` are users whose rows were rejected for a conflict: they are neither entered nor
    exited this run.
    ``taken_at`` is when the snapshot was taken (``snapshot_at`` column or file mtime), if known.
    """

    source: str
    members: pd.DataFrame
    rows: int
    rejected: tuple[RejectedRow, ...] = ()
    held: frozenset[str] = frozenset()
    rejected_count: int = 0
    taken_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a user is, as far as the snapshot says (all optional)."""

    email: str | None = None
    name: str | None = None
    phone: str | None = None
    avatar: str | None = None

    def traits(self) -> dict[str, str]:
        """The identity as Segment traits, in ``IDENTITY_TRAITS`` order, without the unknown."""
        # Spelled out: this runs once per message, and getattr over the names costs 4x as much.
        traits = {}
        if self.email is not None:
            traits["email"] = self.email
        if self.name is not None:
            traits["name"] = self.name
        if self.phone is not None:
            traits["phone"] = self.phone
        if self.avatar is not None:
            traits["avatar"] = self.avatar
        return traits


@dataclass(frozen=True, slots=True)
class Change:
    """One change for one user: set trait ``audience_key`` to ``value``.

    An audience's ``value`` is ``true`` (entered) or ``false`` (left); a computed trait's
    (``computed``) is its new value, or ``None`` when the user no longer has one (a clear).
    """

    audience_key: str
    audience_name: str
    value: TraitValue | None
    message_id: str
    computed: bool = False
    data: str | None = field(default=None, compare=False)
    """A computed trait's value as the planned JSON text (what the state keeps and compares):
    re-serialising ``value`` may spell a float differently."""

    @property
    def json(self) -> str:
        """``value`` as the state's JSON text (``null``: a clear)."""
        return self.data if self.data is not None else trait_json(self.value)

    @property
    def sets(self) -> bool:
        """Whether the change puts something on the profile (entering an audience, or a trait
        value), rather than taking it off (leaving, a clear): only that needs a profile."""
        return self.value is not None if self.computed else self.value is True


@dataclass(frozen=True, slots=True)
class UserUpdate:
    """Everything one run changes for one user, across all audiences in the run.

    A destination may send it as one call (Crisp: one data update with all traits) or one
    message per change (the Segment-style JSONL output).
    """

    user_id: str
    identity: Identity
    changes: tuple[Change, ...]

    @property
    def traits(self) -> Mapping[str, TraitValue | None]:
        """The traits to set, by key (``None``: clear a computed trait)."""
        return {c.audience_key: c.value for c in self.changes}

    @property
    def sets_data(self) -> bool:
        """Whether any change puts something on the profile (``Change.sets``)."""
        return any(c.sets for c in self.changes)


@cache
def _batch_schema() -> pa.Schema:
    import pyarrow as pa

    audience = pa.dictionary(pa.int32(), pa.string())
    return pa.schema(
        [
            ("user_id", pa.string()),
            ("audience_key", audience),
            ("audience_name", audience),
            ("value", pa.bool_()),
            ("message_id", pa.string()),
            *((trait, pa.string()) for trait in IDENTITY_TRAITS),
            ("data", pa.string()),
        ]
    )


def __getattr__(name: str) -> Any:
    """``BATCH_SCHEMA``, the columns of a ``ChangeBatch`` table in order, built on first use."""
    if name == "BATCH_SCHEMA":
        return _batch_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_NO_IDENTITY = Identity()


def input_hash(value: bool, identity: Identity, data: str | None = None) -> str:
    """Fingerprint of what a change sends: a held failure is retried once it changes.

    ``data``: a computed trait's value as JSON (an audience's changes have none, and hash as
    they always have, so their queued rows keep matching).
    """
    parts = [str(value), *(getattr(identity, k) or "" for k in IDENTITY_TRAITS)]
    if data is not None:
        parts.append(data)
    return hashlib.md5("\x1f".join(parts).encode(), usedforsecurity=False).hexdigest()


def trait_json(value: TraitValue | None) -> str:
    """A trait value as the JSON text the state and ``ChangeBatch.data`` keep (``null``: none)."""
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Changes for whole users, in columns: what a destination that takes many at once gets.

    ``table`` follows ``BATCH_SCHEMA``: one row per change, each user's rows adjacent;
    ``audience_key`` and ``audience_name`` are dictionary-encoded, and the identity traits
    (null when unknown) are the same on every row of a user. ``value`` is an audience's
    ``true``/``false``; a computed trait's row has its value as JSON text in ``data``
    (``null``: a clear) and ``value`` says whether the user has a value after the change;
    ``data`` is null on every audience row. ``users`` counts distinct users.
    The same changes as per-user updates: ``updates()``; the way back: ``from_updates()``.
    """

    table: pa.Table
    users: int

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def updates(self) -> Iterator[UserUpdate]:
        """One ``UserUpdate`` per user, in the batch's order."""
        columns = [self.table.column(c).to_pylist() for c in _batch_schema().names]
        users, keys, names, values, message_ids, *traits, data = columns
        n = len(users)
        start = 0
        while start < n:
            user_id = users[start]
            end = start + 1
            while end < n and users[end] == user_id:
                end += 1
            identity = Identity(*(t[start] for t in traits))
            changes = tuple(
                Change(keys[i], names[i], values[i], message_ids[i])
                if data[i] is None
                else Change(keys[i], names[i], orjson.loads(data[i]), message_ids[i], True, data[i])
                for i in range(start, end)
            )
            yield UserUpdate(
                user_id, _NO_IDENTITY if identity == _NO_IDENTITY else identity, changes
            )
            start = end

    @classmethod
    def from_updates(cls, updates: Iterable[UserUpdate]) -> ChangeBatch:
        """The batch of ``updates`` (one per user)."""
        import pyarrow as pa

        rows = [(u, c) for u in updates for c in u.changes]
        columns: dict[str, list[object]] = {
            "user_id": [u.user_id for u, _ in rows],
            "audience_key": [c.audience_key for _, c in rows],
            "audience_name": [c.audience_name for _, c in rows],
            "value": [c.value is not None if c.computed else c.value for _, c in rows],
            "message_id": [c.message_id for _, c in rows],
            **{t: [getattr(u.identity, t) for u, _ in rows] for t in IDENTITY_TRAITS},
            "data": [c.json if c.computed else None for _, c in rows],
        }
        arrays = [
            pa.array(columns[f.name], pa.string()).dictionary_encode()
            if pa.types.is_dictionary(f.type)
            else pa.array(columns[f.name], f.type)
            for f in _batch_schema()
        ]
        table = pa.Table.from_arrays(arrays, schema=_batch_schema())
        return cls(table, len({u.user_id for u, _ in rows}))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the destination did with one ``UserUpdate``.

    ``failed`` + ``retryable`` is retried on the next run; ``failed`` and not ``retryable`` is
    held until the user's input changes or an operator passes ``--retry-failed``; ``skipped``
    (e.g. no email to create the user) is retried on every run, costing no request.
    """

    user_id: str
    status: DeliveryStatus
    reason: str | None = None
    retryable: bool = True
    status_code: int | None = None

    @classmethod
    def delivered(cls, user_id: str) -> Outcome:
        return cls(user_id, DeliveryStatus.DELIVERED)

    @classmethod
    def skipped(cls, user_id: str, reason: str) -> Outcome:
        return cls(user_id, DeliveryStatus.SKIPPED, reason)

    @classmethod
    def failed(
        cls, user_id: str, reason: str, *, retryable: bool = True, status_code: int | None = None
    ) -> Outcome:
        return cls(user_id, DeliveryStatus.FAILED, reason, retryable, status_code)
