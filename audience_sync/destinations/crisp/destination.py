"""The Crisp destination: per-user Identify (profile + audience data) and Track over Crisp's API.

Delivery is concurrent: one intake task pulls updates from the engine in chunks and looks up
their people_ids in one query per chunk; ``max_concurrency`` workers run the per-user request
sequences (``profiles.py``); a shared limiter paces every request under
``requests_per_second``. With ``batch = true`` users whose change is identical and whose
people_id is known are collected into ``PATCH /batch/data`` requests; a refused batch falls back
to per-user requests. Outcomes are yielded as soon as they are confirmed, so the engine commits
them while later requests are in flight.

Stopping: a spent quota stops taking new users, lets requests already on the wire finish and
leaves everything else pending; rejected credentials stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.destinations.base import (
    Call,
    Destination,
    DestinationSettings,
    IdentifyCall,
    TrackEvent,
)
from audience_sync.destinations.budget import RequestBudget, destination_requests
from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.client import CrispClient, segment
from audience_sync.destinations.crisp.facts import (
    BATCH_REFUSED,
    EMAIL_ADDRESSING,
    Facts,
    fingerprint,
)
from audience_sync.destinations.crisp.payloads import (
    DataValue,
    audience_event,
    batch_body,
    event_body,
    identify_parts,
)
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.destinations.crisp.profiles import EMAIL_REQUIRED, Profiles, Step, UserSequence
from audience_sync.destinations.crisp.ratelimit import AdaptiveRateLimiter
from audience_sync.destinations.crisp.settings import CrispCredentials, CrispSettings
from audience_sync.destinations.crisp.tables import crisp_people
from audience_sync.errors import DestinationError, QuotaExhausted
from audience_sync.model import DeliveryStatus, Identity, Outcome, UserUpdate

__all__ = ["TRACK_DROPPED", "CrispDestination"]

log = logging.getLogger("audience_sync.crisp")

TRACK_DROPPED = (
    "dropped: no known Crisp profile for this user (send an Identify with an email first)"
)
#: Updates pulled from the engine (and looked up in ``crisp_people``) at a time.
INTAKE_CHUNK = 200


class CrispDestination(Destination):
    kind = "crisp"
    settings_model = CrispSettings
    uses_state = True
    prices_plans = True
    settings: CrispSettings

    def __init__(
        self,
        settings: DestinationSettings,
        *,
        name: str,
        state: sa.Engine,
        config_dir: Path,
        env: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(settings, name=name, state=state, config_dir=config_dir)
        self._env = os.environ if env is None else env
        self._transport = transport
        self._clock = clock
        self._credentials: CrispCredentials | None = None
        self._http: httpx.AsyncClient | None = None
        self.client: CrispClient | None = None
        self.profiles: Profiles | None = None
        self._delivery: _Delivery | None = None
        self.people = PeopleMap(state, name, clock)
        self.facts = Facts(state, name, fingerprint(self.settings.model_dump_json()), clock)
        self.batch_refused: str | None = None
        """Why the batch route is not used (Crisp refused it in this run or a recent one)."""
        self.budget = RequestBudget(state, name, self.settings.daily_request_budget, clock=clock)
        self.confirmed = 0
        """Users (or Track calls) delivered by this destination object."""

    @classmethod
    def default_name(cls, settings: DestinationSettings) -> str:
        # One state per Crisp website: pointing the config at another website starts afresh.
        assert isinstance(settings, CrispSettings)
        return f"crisp:{settings.website_id}"

    def preflight(self) -> None:
        self._credentials = CrispCredentials.from_env(self._env)

    async def __aenter__(self) -> Self:
        if self._credentials is None:
            self.preflight()
        assert self._credentials is not None
        s = self.settings
        self._http = httpx.AsyncClient(
            base_url=f"{s.api_url}/website/{segment(s.website_id)}",
            auth=httpx.BasicAuth(
                self._credentials.identifier.reveal(), self._credentials.key.reveal()
            ),
            headers={"X-Crisp-Tier": s.tier, "User-Agent": "audience-sync"},
            timeout=s.timeout,
            limits=httpx.Limits(
                max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency
            ),
            transport=self._transport,
        )
        self.client = CrispClient(
            self._http,
            AdaptiveRateLimiter(s.requests_per_second),
            self.budget,
            website_id=s.website_id,
            tier=s.tier,
            max_retries=s.max_retries,
            patience=s.rate_limit_patience,
        )
        known = await asyncio.to_thread(self.facts.load)
        addressing = known.get(EMAIL_ADDRESSING)
        refused = known.get(BATCH_REFUSED)
        if s.batch and refused is not None and refused.value:
            self.batch_refused = refused.detail or "refused"
            log.info(
                "Crisp refused PATCH /batch/data at %s (%s); per-user data updates until the "
                "config changes or a day has passed",
                refused.learned_at.isoformat(timespec="seconds"),
                self.batch_refused,
            )
        self.profiles = Profiles(
            self.client,
            self.people,
            update_profiles=s.update_profiles,
            tier=s.tier,
            email_addressing=None if addressing is None else addressing.value,
            learn=self.remember,
        )
        return self

    async def probe(self) -> str:
        # The first page of profiles: the cheapest read that needs valid credentials. It goes
        # through the client, so it waits for the rate limit and counts against the budget.
        async with self:
            assert self.client is not None
            reply = await self.client.call(
                "GET", "/people/profiles/1", route="GET /people/profiles"
            )
        if not reply.ok:
            raise DestinationError(f"Crisp did not answer the check: {reply.describe()}")
        used = await asyncio.to_thread(self.budget.used_today)
        return (
            f"credentials accepted for website {self.settings.website_id} (1 request; "
            f"{used:,} of {self.budget.limit:,} used today)"
        )

    async def remember(self, fact: str, value: bool, detail: str) -> None:
        """Keep what Crisp's answers taught (``crisp_facts``) for later runs."""
        await asyncio.to_thread(self.facts.remember, fact, value, detail)

    async def __aexit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            await self.budget.release()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (retries included)."""
        return self.client.sent if self.client is not None else 0

    def requests_per_user(self) -> float | None:
        if not self.confirmed or self.client is None:
            return None
        return self.client.sent / self.confirmed

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncGenerator[list[Outcome], None]:
        assert self.profiles is not None, "use the destination as an async context manager"
        run = _Delivery(self, self.profiles, iter(updates))
        self._delivery = run
        try:
            async for outcomes in run.outcomes():
                self.confirmed += sum(o.status is DeliveryStatus.DELIVERED for o in outcomes)
                yield outcomes
        except QuotaExhausted as exc:
            exc.requests_per_user = self.requests_per_user()
            raise
        finally:
            self._delivery = None

    def stop(self) -> None:
        if self._delivery is not None:
            self._delivery.soft_stop(None)

    def describe_plan(self, updates: Sequence[UserUpdate]) -> dict[str, int]:
        """Requests the updates would cost (no batching, no failures), and today's budget."""
        tables = sa.inspect(self.state)
        known = (
            self.people.lookup(u.user_id for u in updates)
            if tables.has_table("crisp_people")
            else {}
        )
        cost = {"users": len(updates), "known": 0, "new": 0, "no_email": 0, "requests": 0}
        for u in updates:
            if u.user_id in known:
                cost["known"] += 1
                cost["requests"] += 1
            elif u.identity.email:
                cost["new"] += 1
                cost["requests"] += 2
            else:
                cost["no_email"] += 1
        used = self.budget.used_today() if tables.has_table("destination_requests") else 0
        left = max(self.budget.limit - used, 0)
        cost["daily_request_budget"] = self.budget.limit
        cost["used_today"] = used
        beyond_today = max(cost["requests"] - left, 0)
        cost["days"] = 1 + math.ceil(beyond_today / self.budget.limit) if cost["requests"] else 0
        return cost

    def previous_sync(self) -> str | None:
        tables = sa.inspect(self.state)
        # Asked before the connection below opens: SQLite would make them wait for each other.
        people_table, requests_table = (
            tables.has_table(t) for t in ("crisp_people", "destination_requests")
        )
        with self.state.connect() as conn:
            if people_table:
                people = conn.scalar(
                    sa.select(sa.func.count()).where(crisp_people.c.destination == self.name)
                )
                if people:
                    return f"crisp_people knows {people:,} of its profiles"
            if requests_table:
                used = conn.scalar(
                    sa.select(sa.func.sum(destination_requests.c.used)).where(
                        destination_requests.c.destination == self.name
                    )
                )
                if used:
                    return f"destination_requests counts {used:,} requests made to it"
        return None

    # -- Track and Identify calls ---------------------------------------------------------------

    async def send_calls(self, calls: Sequence[Call]) -> list[Outcome]:
        profiles = self.profiles
        assert profiles is not None, "use the destination as an async context manager"
        by_user: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            by_user.setdefault(call.user_id, []).append(i)
        known = await asyncio.to_thread(self.people.lookup, by_user)
        outcomes: list[Outcome | None] = [None] * len(calls)
        gate = asyncio.Semaphore(self.settings.max_concurrency)
        stop: list[QuotaExhausted] = []

        async def user_calls(user_id: str, indexes: list[int]) -> None:
            async with gate:
                person = known.get(user_id)
                for i in indexes:
                    if stop:
                        return
                    try:
                        outcomes[i], person = await self._send_call(profiles, calls[i], person)
                    except QuotaExhausted as exc:
                        stop.append(exc)
                        return

        await asyncio.gather(*(user_calls(u, ix) for u, ix in by_user.items()))
        reason = f"not sent: {stop[0]}" if stop else "not sent"
        if stop:
            log.warning("%s", reason)
        final = [
            o or Outcome.failed(c.user_id, reason) for o, c in zip(outcomes, calls, strict=True)
        ]
        self.confirmed += sum(o.status is DeliveryStatus.DELIVERED for o in final)
        return final

    async def _send_call(
        self, profiles: Profiles, call: Call, person: Person | None
    ) -> tuple[Outcome, Person | None]:
        if isinstance(call, TrackEvent):
            if person is None or person.address is None:
                return Outcome.skipped(call.user_id, TRACK_DROPPED), person
            body = event_body(call.event, call.properties)
            seq = UserSequence(call.user_id, Identity(), person, events=[body])
            return _outcome(await profiles.run(seq), call.user_id), seq.person
        assert isinstance(call, IdentifyCall)
        identity, data, left_out = identify_parts(call.traits)
        if left_out:
            log.warning(
                "user_id=%s traits left out (not a boolean, string or number): %s",
                call.user_id,
                ", ".join(left_out),
            )
        seq = UserSequence(call.user_id, identity, person, data=data)
        return _outcome(await profiles.run(seq), call.user_id), seq.person


def _outcome(result: Person | Outcome, user_id: str) -> Outcome:
    return result if isinstance(result, Outcome) else Outcome.delivered(user_id)


# -- concurrent delivery --------------------------------------------------------------------------


class _StopAsked(Exception):
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
    data: tuple[tuple[str, DataValue], ...]
    members: list[_Member]
    cost: int = 1


_Job = _UserJob | _DataJob | _BatchJob


@dataclass(slots=True)
class _Group:
    started: float
    members: list[_Member] = field(default_factory=list)


_DONE = object()
#: Queued after a job's outcomes: its permit is released once the engine committed them.
_COMMITTED = object()


class _Delivery:
    """One ``deliver`` call: intake, workers, batch groups, and the outcome stream."""

    def __init__(self, dest: CrispDestination, profiles: Profiles, updates: Iterator[UserUpdate]):
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
        items = []
        while not self.out.empty():
            items.append(self.out.get_nowait())
        return items

    async def _guard(self, work: Any) -> None:
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
        self.out.put_nowait(outcome)
        self.emitted += 1
        self._settle(1)

    def _settle(self, users: int) -> None:
        self.open_users -= users
        self._check_done()

    def _check_done(self) -> None:
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
        return (
            self.batching
            and person.people_id is not None
            and not self.profiles.needs_update(update.identity, person)
        )

    # -- batch groups ---------------------------------------------------------------------------

    def _group(self, update: UserUpdate, seq: UserSequence) -> None:
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
        group = self.groups.pop(key)
        self._queue(_BatchJob(key, group.members))

    def _flush_if_idle(self) -> None:
        """No user can join a group any more: send the partly filled ones now."""
        if self.intake_done and self.user_jobs == 0:
            for key in list(self.groups):
                self._flush(key)

    async def _linger(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.settings.batch_linger or 0.25))
            now = time.monotonic()
            for key, group in list(self.groups.items()):
                if now - group.started >= self.settings.batch_linger:
                    self._flush(key)

    # -- workers --------------------------------------------------------------------------------

    async def _worker(self) -> None:
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
        self._emit(_outcome(await self.profiles.run(seq, Step.SET_DATA), update.user_id))

    async def _data(self, job: _DataJob) -> None:
        self._emit(_outcome(await self.profiles.run(job.seq, Step.SET_DATA), job.update.user_id))

    async def _batch(self, job: _BatchJob) -> None:
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
        for i in range(0, len(job.members), self.batch_cap):
            self.batches_owed += 1
            self._queue(_BatchJob(job.data, job.members[i : i + self.batch_cap]))

    def _per_user(self, members: list[_Member]) -> None:
        for update, seq in members:
            self._queue(_DataJob(update, seq))

    def _queue(self, job: _Job) -> None:
        self.jobs.put_nowait((int(isinstance(job, _UserJob)), next(self.queued), job))


def _size(job: _Job) -> int:
    return len(job.members) if isinstance(job, _BatchJob) else 1
