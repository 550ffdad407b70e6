"""Crisp's delivery loop: how one ``deliver`` call turns the engine's updates into requests.

Where it sits: the engine hands ``CrispDestination.deliver`` (``destination.py``) its
``UserUpdate``s; ``Delivery`` schedules them and yields ``Outcome``s back as they are confirmed,
for the engine to record. This module is the scheduler: intake, the job queue and its workers,
the day's request budget, stopping. Batch groups and ``PATCH /batch/data`` are in
``batching.py``, routing and running each user in ``users.py``, the jobs it queues in
``jobs.py``; each user's requests are run by ``profiles.py``, each request sent (paced,
counted, retried) by ``client.py``.

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
from collections.abc import AsyncIterator, Iterator
from typing import Any

from audience_sync.destinations.crisp.batching import Batching
from audience_sync.destinations.crisp.jobs import (
    BatchJob,
    DataJob,
    Group,
    GroupKey,
    Host,
    Job,
    StopAsked,
    UserJob,
    as_outcome,
    job_size,
)
from audience_sync.destinations.crisp.profiles import Profiles, UserSequence
from audience_sync.destinations.crisp.users import PerUser
from audience_sync.errors import QuotaExhausted
from audience_sync.model import Outcome, UserUpdate

__all__ = ["INTAKE_CHUNK", "Delivery", "Host", "as_outcome"]

log = logging.getLogger("audience_sync.crisp")

#: Updates pulled from the engine (and looked up in ``crisp_people``) at a time.
INTAKE_CHUNK = 200


_DONE = object()
#: Queued after a job's outcomes: its permit is released once the engine committed them.
_COMMITTED = object()


class Delivery(PerUser, Batching):
    """One ``deliver`` call: intake, workers and the outcome stream (the scheduler), with the
    batch groups (``Batching``) and each user's routing and job (``PerUser``)."""

    def __init__(self, dest: Host, profiles: Profiles, updates: Iterator[UserUpdate]):
        self.dest = dest
        self.settings = dest.settings
        self.profiles = profiles
        self.updates = updates
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        # Started users first: their batches and data updates go before users not started yet.
        self.jobs: asyncio.PriorityQueue[tuple[int, int, Job]] = asyncio.PriorityQueue()
        self.queued = itertools.count()
        self.room = asyncio.Event()
        self.open_users = 0  # taken from the engine, no outcome yet
        self.user_jobs = 0  # user jobs queued or running (they may still join a batch)
        self.intake_done = False
        # Why the run stops taking users: a spent quota (raised at the end), or a stop asked
        # for by the engine (a signal; the run just ends, the rest stays pending).
        self.stopping: QuotaExhausted | StopAsked | None = None
        self.fatal: BaseException | None = None
        self.finished = False
        self.groups: dict[GroupKey, Group] = {}
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
        self.running: dict[int, tuple[Job, UserSequence | None]] = {}
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
            self.stopping = exc if exc is not None else StopAsked()
            log.warning("%s; finishing the requests in flight", self.stopping)
        dropped = sum(len(g.members) for g in self.groups.values())
        self.groups.clear()
        while not self.jobs.empty():
            dropped += job_size(self.jobs.get_nowait()[2])
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
            if isinstance(job, BatchJob):
                self.batches_owed -= 1  # from here on its cost is checked like any job's
            elif isinstance(job, UserJob):
                job.cost = self._cost(job.update, job.person)
            if self.stopping is None and not self._affordable(job.cost):
                # Not started: it stays pending for a later day (a started user is finished).
                self.permits.release()
                self.deferred += job_size(job)
                self._settle(job_size(job))
                if isinstance(job, UserJob):
                    self.user_jobs -= 1
                    self._flush_if_idle()
                continue
            if self.stopping is not None:
                self._settle(job_size(job))
                if isinstance(job, UserJob):
                    self.user_jobs -= 1
                continue
            emitted = self.emitted
            self.running[id(job)] = (job, job.seq if isinstance(job, DataJob) else None)
            try:
                if isinstance(job, UserJob):
                    await self._user(job)
                elif isinstance(job, DataJob):
                    await self._data(job)
                else:
                    await self._batch(job)
            except QuotaExhausted as exc:
                self.soft_stop(exc)
                self._settle(job_size(job))
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
                if isinstance(job, UserJob):
                    self.user_jobs -= 1
                    self._flush_if_idle()

    def _queue(self, job: Job) -> None:
        """Queue a job: started users' batches and data updates first, then in order."""
        self.jobs.put_nowait((int(isinstance(job, UserJob)), next(self.queued), job))
