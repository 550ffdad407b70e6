"""The Crisp destination: per-user Identify (profile + audience data) and Track over Crisp's API.

Where it sits: the engine (through ``runtime.py``) opens ``CrispDestination`` as an async
context manager and calls ``deliver`` with the run's ``UserUpdate``s; ``track`` calls
``send_calls``; ``check`` calls ``preflight`` and ``probe``; ``--dry-run`` calls
``describe_plan``; the lost-state guard calls ``previous_sync``. This module holds the settings,
the HTTP client's set-up and what Crisp taught earlier runs (``crisp_facts``); the concurrent
delivery loop (intake, workers, batches, budget) is ``delivery.py``, one user's requests
``profiles.py``, one request ``client.py``.

Outcomes are yielded as soon as they are confirmed, so the engine commits them while later
requests are in flight. Stopping: a spent quota stops taking new users, lets requests already
on the wire finish and leaves everything else pending; rejected credentials stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

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
from audience_sync.destinations.crisp.client import CrispClient, segment
from audience_sync.destinations.crisp.delivery import INTAKE_CHUNK, Delivery, as_outcome
from audience_sync.destinations.crisp.facts import (
    BATCH_REFUSED,
    EMAIL_ADDRESSING,
    Facts,
    fingerprint,
)
from audience_sync.destinations.crisp.payloads import event_body, identify_parts
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.destinations.crisp.profiles import Profiles, UserSequence
from audience_sync.destinations.crisp.ratelimit import AdaptiveRateLimiter
from audience_sync.destinations.crisp.settings import CrispCredentials, CrispSettings
from audience_sync.destinations.crisp.tables import crisp_people
from audience_sync.errors import DestinationError, QuotaExhausted
from audience_sync.model import DeliveryStatus, Identity, Outcome, UserUpdate

__all__ = ["INTAKE_CHUNK", "TRACK_DROPPED", "CrispDestination"]

log = logging.getLogger("audience_sync.crisp")

TRACK_DROPPED = (
    "dropped: no known Crisp profile for this user (send an Identify with an email first)"
)


class CrispDestination(Destination):
    """Audience memberships as Crisp people data (one ``PATCH`` per user or per batch), Track
    and Identify calls as people events and profiles; keeps people_ids (``crisp_people``),
    learned facts (``crisp_facts``) and the daily request budget in the state database."""

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
        self._delivery: Delivery | None = None
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
        """Read the credentials from the environment: a missing one fails here, before any work."""
        self._credentials = CrispCredentials.from_env(self._env)

    async def __aenter__(self) -> Self:
        """Open the HTTP client (auth, tier, pacing, budget, retries) and the per-user
        ``Profiles``, primed with what earlier runs learned (how emails address profiles,
        whether the batch route was refused)."""
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
        """One cheap authenticated request (``check``): what Crisp said, and today's budget."""
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
        """Give back the budget reserved and not spent, and close the HTTP client."""
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
        """Requests sent per user delivered so far (for the quota error's estimate)."""
        if not self.confirmed or self.client is None:
            return None
        return self.client.sent / self.confirmed

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncGenerator[list[Outcome], None]:
        """Deliver the updates concurrently (``delivery.Delivery``), yielding outcomes as they
        are confirmed."""
        assert self.profiles is not None, "use the destination as an async context manager"
        run = Delivery(self, self.profiles, iter(updates))
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
        """Take no more users; the requests in flight finish (the engine was asked to stop)."""
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
        """What shows this website was synced before (known profiles, requests counted), for the
        lost-state guard; None for a first sync."""
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
        """Send Track and Identify calls (``track``), one outcome per call in order. A user's
        calls go in order, users concurrently; a spent quota fails the calls not sent."""
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
        """One call for a user: a Track as an event on a known profile (dropped without one), an
        Identify as the profile and its data; also the profile as it is now known."""
        if isinstance(call, TrackEvent):
            if person is None or person.address is None:
                return Outcome.skipped(call.user_id, TRACK_DROPPED), person
            body = event_body(call.event, call.properties)
            seq = UserSequence(call.user_id, Identity(), person, events=[body])
            return as_outcome(await profiles.run(seq), call.user_id), seq.person
        assert isinstance(call, IdentifyCall)
        identity, data, left_out = identify_parts(call.traits)
        if left_out:
            log.warning(
                "user_id=%s traits left out (not a boolean, string or number): %s",
                call.user_id,
                ", ".join(left_out),
            )
        seq = UserSequence(call.user_id, identity, person, data=data)
        return as_outcome(await profiles.run(seq), call.user_id), seq.person
