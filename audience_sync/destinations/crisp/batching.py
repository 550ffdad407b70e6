"""Crisp's batches: users whose change is identical and whose people_id is known are
collected into groups (one per custom data) and sent as one ``PATCH /batch/data`` each.

Where it sits: ``delivery.Delivery`` routes a user here (``_group``) when its data update is
all it needs, or after its profile was created or resolved; a group is queued as a
``BatchJob`` when full, after ``batch_linger`` or when no user can join any more, and a worker
sends it (``_batch``). A refused route turns batching off and the members fall back to their
own data updates (``DataJob``s, run by ``profiles.py``). ``Batching`` is the part of
``Delivery`` that does this; the state it uses is ``Delivery``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.facts import BATCH_REFUSED
from audience_sync.destinations.crisp.jobs import (
    BatchJob,
    DataJob,
    Group,
    GroupKey,
    Host,
    Job,
    Member,
    StopAsked,
)
from audience_sync.destinations.crisp.payloads import DataValue, batch_body
from audience_sync.destinations.crisp.profiles import UserSequence
from audience_sync.destinations.crisp.settings import CrispSettings
from audience_sync.errors import DestinationError, QuotaExhausted
from audience_sync.model import Outcome, UserUpdate

__all__ = ["Batching"]

log = logging.getLogger("audience_sync.crisp")


class Batching:
    """Batch groups and ``PATCH /batch/data`` (a part of ``delivery.Delivery``)."""

    dest: Host
    settings: CrispSettings
    stopping: QuotaExhausted | StopAsked | None
    intake_done: bool
    user_jobs: int
    spent: int
    groups: dict[GroupKey, Group]
    batching: bool
    batch_cap: int
    batch_confirmed: bool
    batch_probe: asyncio.Lock
    batches_owed: int

    if TYPE_CHECKING:  # Delivery's and PerUser's (declared only for the type checker, so
        # these never shadow the real methods in Delivery's method resolution order)

        def _queue(self, job: Job) -> None: ...
        def _emit(self, outcome: Outcome) -> None: ...
        def _settle(self, users: int) -> None: ...
        def _custom_data(self, update: UserUpdate) -> dict[str, DataValue]: ...

    def _group(self, update: UserUpdate, seq: UserSequence) -> None:
        """Add a user to the open group for its custom data (opening one reserves its request);
        a full group is sent."""
        if self.stopping is not None:
            self._settle(1)  # no batch will be sent any more: stays pending
            return
        key = tuple(sorted(self._custom_data(update).items()))
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(time.monotonic())
            self.batches_owed += 1  # its request is reserved from the day's budget
        group.members.append((update, seq))
        if len(group.members) >= self.batch_cap:
            self._flush(key)

    def _flush(self, key: GroupKey) -> None:
        """Queue the group for ``key`` as a batch job."""
        group = self.groups.pop(key)
        self._queue(BatchJob(key, group.members))

    def _flush_if_idle(self) -> None:
        """No user can join a group any more: send the partly filled ones now."""
        if self.intake_done and self.user_jobs == 0:
            for key in list(self.groups):
                self._flush(key)

    async def _linger(self) -> None:
        """Send groups that have waited ``batch_linger`` for more members."""
        while True:
            await asyncio.sleep(min(0.25, self.settings.batch_linger or 0.25))
            now = time.monotonic()
            for key, group in list(self.groups.items()):
                if now - group.started >= self.settings.batch_linger:
                    self._flush(key)

    async def _batch(self, job: BatchJob) -> None:
        """Send one ``PATCH /batch/data``. A refusal turns batching off (remembered for later
        runs) and sends the members' data one by one; an unknown website stops the run; a
        permanent error halves the batch size and splits the batch; a transient one fails the
        members (retried next run); otherwise (one unknown profile fails the whole batch) it
        goes user by user. Until the route has answered once, batches go one at a time
        (``batch_probe``), so a refusal costs one request."""
        members = job.members
        if not self.batching:
            self._per_user(members)
            return
        if len(members) > self.batch_cap:  # the cap shrank after a refusal: split
            self._split(job)
            return
        assert self.dest.client is not None
        ids = [q.person.people_id for _, q in members if q.person and q.person.people_id]
        probe = None if self.batch_confirmed else self.batch_probe
        if probe is not None:
            await probe.acquire()
        try:
            if not self.batching:  # refused while this batch waited for the probe
                self._per_user(members)
                return
            reply = await self.dest.client.call(
                "PATCH",
                "/batch/data",
                route="PATCH /batch/data",
                json=batch_body(ids, dict(job.data)),
            )
            self.spent += reply.attempts
            if reply.verdict is Verdict.REFUSED:
                self.batching = False
                self.dest.batch_refused = reply.describe()
                log.warning(
                    "Crisp refused PATCH /batch/data (%s); sending per-user data updates "
                    "instead, in this run and later ones until the config changes or a day "
                    "has passed",
                    reply.describe(),
                )
                await self.dest.remember(BATCH_REFUSED, True, reply.describe())
                self._per_user(members)
                return
            self.batch_confirmed = self.batch_confirmed or reply.ok
        finally:
            if probe is not None:
                probe.release()
        if reply.ok:
            for update, _ in members:
                self._emit(Outcome.delivered(update.user_id))
            return
        verdict = reply.verdict
        if verdict is Verdict.WEBSITE:
            raise DestinationError(
                f"Crisp does not know website {self.settings.website_id!r} ({reply.describe()})"
            )
        if verdict is Verdict.PERMANENT and len(members) > 1:
            # Maybe too many profiles for one request (the cap is undocumented): halve it.
            self.batch_cap = max(2, len(members) // 2)
            log.warning(
                "batch of %d refused (%s); trying batches of %d",
                len(members),
                reply.describe(),
                self.batch_cap,
            )
            if self.batch_cap < len(members):
                self._split(job)
                return
        elif verdict is Verdict.TRANSIENT:
            for update, _ in members:
                self._emit(
                    Outcome.failed(
                        update.user_id,
                        f"batch data update: {reply.describe()} (retried; will retry next run)",
                        status_code=reply.status or None,
                    )
                )
            return
        # One unknown profile fails the whole batch (all or nothing): go user by user.
        self._per_user(members)

    def _split(self, job: BatchJob) -> None:
        """Queue a batch again as batches of at most ``batch_cap`` (each reserving its request)."""
        for i in range(0, len(job.members), self.batch_cap):
            self.batches_owed += 1
            self._queue(BatchJob(job.data, job.members[i : i + self.batch_cap]))

    def _per_user(self, members: list[Member]) -> None:
        """Queue each member's own data update."""
        for update, seq in members:
            self._queue(DataJob(update, seq))
