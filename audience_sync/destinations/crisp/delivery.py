"""Crisp's delivery loop: how one ``deliver`` call turns the engine's updates into requests.

Where it sits: the engine hands ``CrispDestination.deliver`` (``destination.py``) its
``UserUpdate``s; ``Delivery`` schedules them and yields ``Outcome``s back as they are confirmed,
for the engine to record. Each user's requests are run by ``profiles.py``, each request sent
(paced, counted, retried) by ``client.py``.

One intake task pulls updates from the engine in chunks of ``INTAKE_CHUNK`` and looks up their
people_ids in one query per chunk, then routes each user: settled at once (nothing to send, or
no email to create a profile with), into a batch group, or queued as a per-user job.
``max_concurrency`` workers take jobs from one priority queue (started users' batches and data
updates before users not started yet). With batching, users whose change is identical and whose
people_id is known are collected into ``PATCH /batch/data`` requests; a refused batch falls back
to per-user requests.

The day's request budget is spent on users that can be finished: a job starts only when what is
left covers its expected cost on top of what started jobs and open batches may still need;
others stay pending (deferred). A job holds a permit from its first request until the engine
has committed its outcome, so a kill loses at most ``max_concurrency`` jobs' records.

Stopping: a spent quota (or a stop asked for) takes no new users, lets requests already on the
wire finish and leaves everything else pending; any other error (rejected credentials, an
unknown website) stops at once. The run is done when intake has ended and every user taken has
an outcome or was left pending.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from audience_sync.destinations.budget import RequestBudget
from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.client import CrispClient
from audience_sync.destinations.crisp.facts import BATCH_REFUSED
from audience_sync.destinations.crisp.payloads import DataValue, audience_event, batch_body
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.destinations.crisp.profiles import EMAIL_REQUIRED, Profiles, Step, UserSequence
from audience_sync.destinations.crisp.settings import CrispSettings
from audience_sync.errors import DestinationError, QuotaExhausted
from audience_sync.model import Outcome, UserUpdate

__all__ = ["INTAKE_CHUNK", "Delivery", "Host", "as_outcome"]

log = logging.getLogger("audience_sync.crisp")

#: Updates pulled from the engine (and looked up in ``crisp_people``) at a time.
INTAKE_CHUNK = 200


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


class _StopAsked(Exception):
    """The engine asked the run to stop (a signal): it ends, the rest stays pending."""

    def __str__(self) -> str:
        return "stop asked for"


@dataclass(slots=True)
class _UserJob:
    """A user whose profile may need creating, resolving or updating first."""

    update: UserUpdate
    person: Person | None
    cost: int = 0
    """Requests the user is expected to cost (reserved from the day's budget when started)."""


@dataclass(slots=True)
class _DataJob:
    """A known profile: its data update, continuing the user's sequence (a batch fallback)."""

    update: UserUpdate
    seq: UserSequence
    cost: int = 1


_Member = tuple[UserUpdate, UserSequence]


@dataclass(slots=True)
class _BatchJob:
    """Users whose custom data is identical and whose people_id is known: one
    ``PATCH /batch/data`` for all of them."""

    data: tuple[tuple[str, DataValue], ...]
    members: list[_Member]
    cost: int = 1


_Job = _UserJob | _DataJob | _BatchJob


@dataclass(slots=True)
class _Group:
    """A batch being filled: sent when full, after ``batch_linger``, or when no user can join."""

    started: float
    members: list[_Member] = field(default_factory=list)


_DONE = object()
#: Queued after a job's outcomes: its permit is released once the engine committed them.
_COMMITTED = object()


class Delivery:
    """One ``deliver`` call: intake, workers, batch groups, and the outcome stream."""

    def __init__(self, dest: Host, profiles: Profiles, updates: Iterator[UserUpdate]):
        self.dest = dest
        self.settings = dest.settings
        self.profiles = profiles
        self.updates = updates
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        # Started users first: their batches and data updates go before users not started yet.
        self.jobs: asyncio.PriorityQueue[tuple[int, int, _Job]] = asyncio.PriorityQueue()
        self.queued = itertools.count()
        self.room = asyncio.Event()
        self.open_users = 0  # taken from the engine, no outcome yet
        self.user_jobs = 0  # user jobs queued or running (they may still join a batch)
        self.intake_done = False
        # Why the run stops taking users: a spent quota (raised at the end), or a stop asked
        # for by the engine (a signal; the run just ends, the rest stays pending).
        self.stopping: QuotaExhausted | _StopAsked | None = None
        self.fatal: BaseException | None = None
        self.finished = False
        self.groups: dict[tuple[tuple[str, DataValue], ...], _Group] = {}
        self.batching = (
            self.settings.batch and not self.settings.audience_events and not dest.batch_refused
        )
        self.batch_cap = self.settings.batch_size
        # Until the batch route answered once, one batch at a time: a refusal then costs one
        # request per run, not one per batch already on the wire.
        self.batch_confirmed = False
        self.batch_probe = asyncio.Lock()
        # The day's budget is spent on users that can be finished: a user starts only when
        # what is left covers its expected cost on top of what started users may still need.
        self.left: int | None = None
        self.sent_at_start = 0
        self.running: dict[int, tuple[_Job, UserSequence | None]] = {}
        self.spent = 0
        """Requests (retries included) of the jobs that finished, and of batch calls."""
        self.batches_owed = 0
        """Batch requests that groups and queued batches will need."""
        self.deferred = 0
        # A job holds a permit from its first request until the engine has committed its
        # outcome, so a kill at any moment leaves at most max_concurrency jobs unrecorded: the
        # next run re-sends at most their calls, however slow the state database is.
        self.permits = asyncio.Semaphore(self.settings.max_concurrency)
        self.emitted = 0

    # -- the stream the engine reads ----------------------------------------------------------

    async def outcomes(self) -> AsyncIterator[list[Outcome]]:
        """Run intake, workers and the linger timer; yield outcomes as jobs confirm them.

        Releases a job's permit only after the engine has come back for more (it committed
        what was yielded). Ends when every user taken is settled, then raises a spent quota,
        or what stopped the run at once.
        """
        client = self.dest.client
        assert client is not None
        budget = self.dest.budget
        self.left = budget.limit - await asyncio.to_thread(budget.used_today)
        self.sent_at_start = client.sent
        tasks = [asyncio.create_task(self._guard(self._intake()))]
        tasks += [
            asyncio.create_task(self._guard(self._worker()))
            for _ in range(self.settings.max_concurrency)
        ]
        if self.batching:
            tasks.append(asyncio.create_task(self._guard(self._linger())))
        try:
            while True:
                item = await self.out.get()
                items = [item]
                while not self.out.empty():
                    items.append(self.out.get_nowait())
                done = any(i is _DONE for i in items)
                ready = [i for i in items if isinstance(i, Outcome)]
                committed = sum(1 for i in items if i is _COMMITTED)
                if ready:
                    yield ready  # the engine resumes us once these are committed
                for _ in range(committed):
                    self.permits.release()
                if done or self.fatal is not None:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Outcomes confirmed while stopping still count.
        late = [i for i in self._drain() if isinstance(i, Outcome)]
        if late:
            yield late
        if self.fatal is not None:
            raise self.fatal
        if isinstance(self.stopping, QuotaExhausted):
            raise self.stopping
        if self.deferred and self.stopping is None:
            used = budget.limit - (self.left or 0) + client.sent - self.sent_at_start
            raise QuotaExhausted(
                f"quota: {used:,} of {budget.limit:,} requests used today (UTC) by "
                f"{self.dest.name}; {self.deferred:,} users deferred, not started: the "
                f"{budget.limit - used:,} left could not finish them (a new user needs 2: "
                "create + data); stopped before passing daily_request_budget",
                used=used,
                budget=budget.limit,
            )

    def _drain(self) -> list[Any]:
        """What is queued for the stream now, without waiting."""
        items = []
        while not self.out.empty():
            items.append(self.out.get_nowait())
        return items

    async def _guard(self, work: Any) -> None:
        """Run a task: a spent quota stops softly; any other error ends the stream at once (raised
        by ``outcomes``)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except QuotaExhausted as exc:
            self.soft_stop(exc)
        except BaseException as exc:
            if self.fatal is None:
                self.fatal = exc
            self.out.put_nowait(_DONE)

    def _emit(self, outcome: Outcome) -> None:
        """Hand one user's outcome to the stream; the user is settled."""
        self.out.put_nowait(outcome)
        self.emitted += 1
        self._settle(1)

    def _settle(self, users: int) -> None:
        """``users`` have an outcome or stay pending: fewer left open."""
        self.open_users -= users
        self._check_done()

    def _check_done(self) -> None:
        """End the stream once intake has ended and no user taken is left open."""
        if self.intake_done and self.open_users == 0 and not self.finished:
            self.finished = True
            self.out.put_nowait(_DONE)

    def soft_stop(self, exc: QuotaExhausted | None) -> None:
        """Quota spent (or a stop asked for): take no more users; what is queued or grouped
        stays pending."""
        if self.stopping is None:
            self.stopping = exc if exc is not None else _StopAsked()
            log.warning("%s; finishing the requests in flight", self.stopping)
        dropped = sum(len(g.members) for g in self.groups.values())
        self.groups.clear()
        while not self.jobs.empty():
            dropped += _size(self.jobs.get_nowait()[2])
        self.room.set()
        self._settle(dropped)

    # -- intake ---------------------------------------------------------------------------------

    async def _intake(self) -> None:
        """Pull updates from the engine a chunk at a time (one ``crisp_people`` lookup each) and
        route them, while the job queue has room (back-pressure on the engine's iterator)."""
        high_water = 4 * self.settings.max_concurrency
        try:
            while self.stopping is None:
                while self.jobs.qsize() >= high_water and self.stopping is None:
                    self.room.clear()
                    await self.room.wait()
                chunk = list(itertools.islice(self.updates, INTAKE_CHUNK))
                if not chunk or self.stopping is not None:
                    break
                known = await asyncio.to_thread(self.dest.people.lookup, (u.user_id for u in chunk))
                for update in chunk:
                    self.open_users += 1
                    self._route(update, known.get(update.user_id))
        finally:
            self.intake_done = True
            self._flush_if_idle()
            self._check_done()

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
        self._queue(_UserJob(update, person))

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

    def _affordable(self, cost: int) -> bool:
        """Whether today's budget covers ``cost`` more requests beyond what started users and
        batches may still need."""
        if self.left is None:
            return True
        owed = self.batches_owed + sum(
            job.cost if seq is None else max(job.cost, seq.unaccounted)
            for job, seq in self.running.values()
        )
        return self.spent + owed + cost <= self.left

    def _batchable(self, update: UserUpdate, person: Person) -> bool:
        """Whether the user needs nothing but its data update, by people_id (so it can join a
        batch)."""
        return (
            self.batching
            and person.people_id is not None
            and not self.profiles.needs_update(update.identity, person)
        )

    # -- batch groups ---------------------------------------------------------------------------

    def _group(self, update: UserUpdate, seq: UserSequence) -> None:
        """Add a user to the open group for its custom data (opening one reserves its request);
        a full group is sent."""
        if self.stopping is not None:
            self._settle(1)  # no batch will be sent any more: stays pending
            return
        key = tuple(sorted(self._custom_data(update).items()))
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(time.monotonic())
            self.batches_owed += 1  # its request is reserved from the day's budget
        group.members.append((update, seq))
        if len(group.members) >= self.batch_cap:
            self._flush(key)

    def _flush(self, key: tuple[tuple[str, DataValue], ...]) -> None:
        """Queue the group for ``key`` as a batch job."""
        group = self.groups.pop(key)
        self._queue(_BatchJob(key, group.members))

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

    # -- workers --------------------------------------------------------------------------------

    async def _worker(self) -> None:
        """Take jobs from the queue and run them, each under a permit and only when the day's
        budget covers its cost (else it stays pending, deferred); while stopping, settle queued
        jobs as pending without running them."""
        while True:
            _, _, job = await self.jobs.get()
            self.room.set()
            if self.stopping is None:
                await self.permits.acquire()
                if self.stopping is not None:
                    self.permits.release()
            if isinstance(job, _BatchJob):
                self.batches_owed -= 1  # from here on its cost is checked like any job's
            elif isinstance(job, _UserJob):
                job.cost = self._cost(job.update, job.person)
            if self.stopping is None and not self._affordable(job.cost):
                # Not started: it stays pending for a later day (a started user is finished).
                self.permits.release()
                self.deferred += _size(job)
                self._settle(_size(job))
                if isinstance(job, _UserJob):
                    self.user_jobs -= 1
                    self._flush_if_idle()
                continue
            if self.stopping is not None:
                self._settle(_size(job))
                if isinstance(job, _UserJob):
                    self.user_jobs -= 1
                continue
            emitted = self.emitted
            self.running[id(job)] = (job, job.seq if isinstance(job, _DataJob) else None)
            try:
                if isinstance(job, _UserJob):
                    await self._user(job)
                elif isinstance(job, _DataJob):
                    await self._data(job)
                else:
                    await self._batch(job)
            except QuotaExhausted as exc:
                self.soft_stop(exc)
                self._settle(_size(job))
            finally:
                _, seq = self.running.pop(id(job), (job, None))
                if seq is not None:
                    self.spent += seq.account()
                if self.emitted > emitted:
                    # Released after the engine committed what was emitted so far (this job's
                    # outcome, and possibly others'): never before this job's.
                    self.out.put_nowait(_COMMITTED)
                else:  # nothing to commit (the user joined a batch, or went back in the queue)
                    self.permits.release()
                if isinstance(job, _UserJob):
                    self.user_jobs -= 1
                    self._flush_if_idle()

    async def _user(self, job: _UserJob) -> None:
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

    async def _data(self, job: _DataJob) -> None:
        """A user's own data update, after its batch could not be sent."""
        self._emit(as_outcome(await self.profiles.run(job.seq, Step.SET_DATA), job.update.user_id))

    async def _batch(self, job: _BatchJob) -> None:
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

    def _split(self, job: _BatchJob) -> None:
        """Queue a batch again as batches of at most ``batch_cap`` (each reserving its request)."""
        for i in range(0, len(job.members), self.batch_cap):
            self.batches_owed += 1
            self._queue(_BatchJob(job.data, job.members[i : i + self.batch_cap]))

    def _per_user(self, members: list[_Member]) -> None:
        """Queue each member's own data update."""
        for update, seq in members:
            self._queue(_DataJob(update, seq))

    def _queue(self, job: _Job) -> None:
        """Queue a job: started users' batches and data updates first, then in order."""
        self.jobs.put_nowait((int(isinstance(job, _UserJob)), next(self.queued), job))


def _size(job: _Job) -> int:
    """Users a job settles."""
    return len(job.members) if isinstance(job, _BatchJob) else 1
