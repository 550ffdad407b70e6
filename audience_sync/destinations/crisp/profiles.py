"""One user's requests to Crisp, as a small bounded state machine (no recursion).

A user's sequence starts from what ``crisp_people`` knows and walks these steps, each named in
``Step`` (the full table, with answers and costs, is in docs/crisp.md):

- CREATE, ``POST /people/profile``: people_id -> SET_DATA; ``people_exists`` -> RESOLVE.
- RESOLVE, no request: address the profile by email (-> UPDATE_PROFILE or SET_DATA), or
  SEARCH when emails are known not to address profiles.
- SEARCH, ``GET /people/profiles/1?search_text=``: found -> UPDATE_PROFILE or SET_DATA by
  people_id; not found -> CREATE (deleted in Crisp) or failed (Crisp said it exists).
- UPDATE_PROFILE, ``PATCH /people/profile/{id}``: 2xx, 400, 409 -> SET_DATA; 404 -> NOT_FOUND.
- SET_DATA, ``PATCH /people/data/{id}``: 2xx -> EVENTS or done; 404 -> NOT_FOUND.
- EVENTS, ``POST /people/events/{id}`` per event: 2xx -> next or done; 404 -> NOT_FOUND.
- NOT_FOUND, no request: addressed by email -> SEARCH; by people_id -> CREATE (deleted).

Each request step runs at most twice (EVENTS twice plus once per event) and CREATE at most
once per user per run, and ``MAX_REQUESTS`` caps the whole sequence (plus one per event),
whatever Crisp answers: a user who reaches the cap is failed with what Crisp answered, and the
run goes on. Rate-limit and transient retries of one request (``client.py``) are not counted
against the cap.

"Emails do not address profiles" is learned from a 404 on any route addressed by email, when
the profile is known to exist (Crisp just answered ``people_exists``, or a search finds it),
and is kept in ``crisp_facts`` so later runs search directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.client import CrispClient, Reply, segment
from audience_sync.destinations.crisp.facts import EMAIL_ADDRESSING
from audience_sync.destinations.crisp.payloads import (
    DataValue,
    card_hash,
    data_body,
    profile_card,
)
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.errors import CredentialsError, DestinationError
from audience_sync.model import Identity, Outcome

__all__ = ["EMAIL_REQUIRED", "MAX_REQUESTS", "Profiles", "Step", "UserSequence"]

log = logging.getLogger("audience_sync.crisp")

EMAIL_REQUIRED = "email required to create a Crisp profile"
#: Requests one user may cost in one run (plus one per event, plus retries of one request).
#: The dearest legitimate path is 5: create (people_exists) -> profile update by email (404:
#: emails do not address profiles, learned once) -> search -> profile update -> data.
MAX_REQUESTS = 5
#: How often one request step may run for one user in one run (by email, then by people_id).
MAX_VISITS = 2
#: Seconds an existing profile waits for the first one to learn whether emails address profiles.
PROBE_WAIT = 10.0


class Step(enum.Enum):
    CREATE = "create"
    RESOLVE = "resolve"
    SEARCH = "search"
    UPDATE_PROFILE = "update profile"
    SET_DATA = "set data"
    EVENTS = "events"
    NOT_FOUND = "not found"


@dataclass(slots=True)
class UserSequence:
    """One user's walk through the steps in one run."""

    user_id: str
    identity: Identity
    person: Person | None
    data: Mapping[str, DataValue] = field(default_factory=dict)
    events: Sequence[dict[str, Any]] = ()
    stop_before_data: bool = False
    """Return the resolved profile at SET_DATA (its data goes in a batch instead)."""
    sets: bool = True
    """Whether ``data`` puts something on the profile (``UserUpdate.sets_data``); leaving
    audiences and clearing traits need no profile, so none is created for them."""
    requests: int = 0
    """Requests started (each with its retries), counted against the cap."""
    answered: int = 0
    sent: int = 0
    """HTTP requests sent, retries included (what the day's budget counts)."""
    accounted: int = 0
    """Of ``sent``, what the delivery has already counted as spent."""
    visits: dict[Step, int] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    """What Crisp answered, step by step (for the reason of a failure)."""
    exists: bool = False
    """Crisp said a profile with this email exists (``people_exists``) this run."""
    events_sent: int = 0

    @property
    def unaccounted(self) -> int:
        """Requests sent or on the wire that the delivery has not counted yet."""
        return self.sent - self.accounted + self.requests - self.answered

    def account(self) -> int:
        """The requests sent since the last call (for the delivery's budget)."""
        fresh, self.accounted = self.sent - self.accounted, self.sent
        return fresh

    @property
    def cap(self) -> int:
        return MAX_REQUESTS + len(self.events)

    @property
    def email(self) -> str | None:
        return self.identity.email or (self.person.email if self.person else None)

    def trail(self) -> str:
        return "; ".join(self.answers[-MAX_REQUESTS:])


_Next = Step | Outcome | Person


class Profiles:
    """Per-user request sequences, sharing one client and what the run learned."""

    def __init__(
        self,
        client: CrispClient,
        people: PeopleMap,
        *,
        update_profiles: bool,
        tier: str,
        email_addressing: bool | None = None,
        learn: Callable[[str, bool, str], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.people = people
        self.update_profiles = update_profiles
        self.tier = tier
        self.email_addressing = email_addressing
        """Whether Crisp accepts an email in place of a people_id (None: not known yet)."""
        self._learn = learn
        # The first existing profile finds that out; the others wait for its answer a moment
        # instead of each spending requests on the same question.
        self._probe: asyncio.Event | None = None
        self._prober: str | None = None
        # Which user_id claimed which (lowercased) email in this run: one Crisp profile
        # cannot carry two users' memberships.
        self._claims: dict[str, str] = {}
        self._handlers: dict[Step, Callable[[UserSequence], Awaitable[_Next]]] = {
            Step.CREATE: self._create,
            Step.RESOLVE: self._resolve,
            Step.SEARCH: self._search,
            Step.UPDATE_PROFILE: self._update_profile,
            Step.SET_DATA: self._set_data,
            Step.EVENTS: self._events,
        }

    async def _learned(self, accepted: bool, seq: UserSequence, detail: str) -> None:
        if self.email_addressing is not accepted:
            self.email_addressing = accepted
            if not accepted:
                log.info(
                    "Crisp does not accept an email in place of people_id (%s); searching "
                    "instead, in this run and later ones",
                    detail,
                )
            if self._learn is not None:
                await self._learn(EMAIL_ADDRESSING, accepted, detail)
        self._end_probe(seq.user_id)

    def _end_probe(self, user_id: str) -> None:
        if self._probe is not None and self._prober == user_id:
            self._probe.set()

    # -- the machine ---------------------------------------------------------------------------

    def needs_update(self, identity: Identity, person: Person) -> bool:
        """Whether the profile card differs from what Crisp was last sent (or found)."""
        if not self.update_profiles:
            return False
        card = profile_card(identity)
        if not card or card_hash(card) == person.profile_hash:
            return False
        # Crisp compares emails without case: a case difference alone is no reason to update.
        return (
            bool(card.get("person"))
            or str(card.get("email", "")).lower() != str(person.email or "").lower()
        )

    async def run(self, seq: UserSequence, start: Step | None = None) -> Person | Outcome:
        """Walk ``seq`` to its end: the outcome, or (``stop_before_data``) the profile.

        ``start`` continues a sequence stopped before its data (a batch that fell back)."""
        if start is not None:
            seq.stop_before_data = False  # continued: its data is sent here, not in a batch
        try:
            step: _Next = self._first(seq) if start is None else start
            while isinstance(step, Step):
                if step is Step.NOT_FOUND:
                    step = await self._not_found(seq)
                    continue
                visits = seq.visits.get(step, 0)
                if seq.requests >= seq.cap or visits >= self._max_visits(seq, step):
                    return self._gave_up(seq)
                seq.visits[step] = visits + 1
                step = await self._handlers[step](seq)
            return step
        finally:
            self._end_probe(seq.user_id)

    @staticmethod
    def _max_visits(seq: UserSequence, step: Step) -> int:
        """EVENTS comes back once per event: its limit grows with them (as ``seq.cap`` does)."""
        return MAX_VISITS + len(seq.events) if step is Step.EVENTS else MAX_VISITS

    def _first(self, seq: UserSequence) -> _Next:
        person = seq.person
        if person is None or person.address is None:
            return (
                Step.CREATE if seq.identity.email else Outcome.skipped(seq.user_id, EMAIL_REQUIRED)
            )
        if person.people_id is None and self.email_addressing is False:
            return Step.SEARCH  # a profile found by email in an earlier run: search directly
        if self.needs_update(seq.identity, person):
            return Step.UPDATE_PROFILE
        return self._after_profile(seq)

    def _after_profile(self, seq: UserSequence) -> _Next:
        if seq.stop_before_data and seq.person is not None and seq.person.people_id:
            return seq.person  # its data goes in a batch
        if seq.data:
            return Step.SET_DATA
        if seq.events_sent < len(seq.events):
            return Step.EVENTS
        return Outcome.delivered(seq.user_id)

    def _profile_found(self, seq: UserSequence) -> _Next:
        assert seq.person is not None
        if self.needs_update(seq.identity, seq.person):
            return Step.UPDATE_PROFILE
        return self._after_profile(seq)

    async def _call(
        self, seq: UserSequence, method: str, path: str, route: str, **kw: Any
    ) -> Reply:
        seq.requests += 1
        try:
            reply = await self.client.call(method, path, route=route, **kw)
        finally:
            seq.answered += 1
        seq.sent += reply.attempts
        seq.answers.append(f"{reply.status or reply.reason} from {route}")
        return reply

    # -- steps -----------------------------------------------------------------------------------

    async def _create(self, seq: UserSequence) -> _Next:
        email = seq.email
        if not email:
            return Outcome.skipped(
                seq.user_id, f"the Crisp profile no longer exists; {EMAIL_REQUIRED}"
            )
        other = self._claims.setdefault(email.lower(), seq.user_id)
        if other != seq.user_id:
            return self._shared(seq, other)
        card = profile_card(
            Identity(email, seq.identity.name, seq.identity.phone, seq.identity.avatar)
        )
        reply = await self._call(seq, "POST", "/people/profile", "POST /people/profile", json=card)
        if reply.ok:
            people_id = reply.data.get("people_id") if isinstance(reply.data, dict) else None
            if not isinstance(people_id, str) or not people_id:
                # Not a Crisp envelope (a proxy's page, an empty body): the profile may or may
                # not exist now; the next run's create answers people_exists if it does.
                return Outcome.failed(
                    seq.user_id,
                    "Crisp answered the profile create without a people_id "
                    f"({reply.describe_body()}); retried next run",
                    status_code=reply.status,
                )
            seq.person = Person(people_id, email, card_hash(card))
            await self.people.save(seq.user_id, seq.person)
            return self._after_profile(seq)
        if reply.verdict is Verdict.CONFLICT:
            seq.exists = True
            return Step.RESOLVE
        return self._refused(seq, reply, "creating the profile")

    async def _resolve(self, seq: UserSequence) -> _Next:
        """A profile with this email exists (made by the chat widget, or by a create whose
        answer was lost): address it by email, or search for its people_id."""
        email = seq.email
        assert email is not None
        other = await asyncio.to_thread(self.people.owner_of, email, seq.user_id)
        if other is not None:
            return self._shared(seq, other)
        if self.email_addressing is None:
            if self._probe is None:
                self._probe, self._prober = asyncio.Event(), seq.user_id
            elif self._prober != seq.user_id:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe.wait(), PROBE_WAIT)
        if self.email_addressing is False:
            return Step.SEARCH
        # Tentative: the next request by email confirms that Crisp takes it (or we search).
        seq.person = Person(None, email, card_hash({"email": email}))
        await self.people.save(seq.user_id, seq.person)
        return self._profile_found(seq)

    async def _search(self, seq: UserSequence) -> _Next:
        email = seq.email
        if not email:
            await self.people.forget(seq.user_id)
            return Outcome.skipped(
                seq.user_id, f"the Crisp profile no longer exists; {EMAIL_REQUIRED}"
            )
        reply = await self._call(
            seq,
            "GET",
            "/people/profiles/1",
            "GET /people/profiles",
            params={"search_text": email},
        )
        if not reply.ok:
            return self._refused(seq, reply, "searching the profile by email")
        for item in reply.data if isinstance(reply.data, list) else []:
            if (
                isinstance(item, dict)
                and str(item.get("email", "")).lower() == email.lower()
                and item.get("people_id")
            ):
                if seq.person is not None and seq.person.people_id is None:
                    # Crisp has the profile but did not take its email as an address.
                    await self._learned(False, seq, "a search found the profile")
                found = str(item["email"])
                seq.person = Person(str(item["people_id"]), found, card_hash({"email": found}))
                await self.people.save(seq.user_id, seq.person)
                return self._profile_found(seq)
        if seq.exists:
            return Outcome.failed(
                seq.user_id,
                "Crisp answered people_exists for this email but a search does not find the "
                "profile (yet); retried next run",
            )
        return await self._gone(seq)

    async def _by_address(
        self, seq: UserSequence, method: str, what: str, body: Any
    ) -> _Next | Reply:
        """``METHOD /people/{what}/{id}``: the reply, or NOT_FOUND on a 404 ``people_not_found``."""
        person = seq.person
        assert person is not None and person.address is not None
        reply = await self._call(
            seq,
            method,
            f"/people/{what}/{segment(person.address)}",
            f"{method} /people/{what}",
            json=body,
        )
        if reply.ok and person.people_id is None:
            await self._learned(True, seq, reply.describe())
        if reply.verdict is Verdict.NOT_FOUND:
            return Step.NOT_FOUND
        return reply

    async def _update_profile(self, seq: UserSequence) -> _Next:
        person = seq.person
        assert person is not None
        card = profile_card(seq.identity)
        reply = await self._by_address(seq, "PATCH", "profile", card)
        if not isinstance(reply, Reply):
            return reply
        if reply.ok:
            # Addressed by email and the email changed: the new one addresses it from now on.
            seq.person = Person(person.people_id, card.get("email", person.email), card_hash(card))
            await self.people.save(seq.user_id, seq.person)
            return self._after_profile(seq)
        if reply.verdict in (Verdict.PERMANENT, Verdict.CONFLICT):
            # The membership matters more than the card: send the data anyway; the card is
            # tried again when the identity changes next (its hash is kept as sent).
            log.warning(
                "user_id=%s profile update refused (%s); audience data is sent anyway",
                seq.user_id,
                reply.describe(),
            )
            seq.person = person.with_hash(card_hash(card))
            await self.people.save(seq.user_id, seq.person)
            return self._after_profile(seq)
        return self._refused(seq, reply, "updating the profile")

    async def _set_data(self, seq: UserSequence) -> _Next:
        """Merge the data into the profile's custom data (PATCH, never PUT: PUT wipes the rest)."""
        reply = await self._by_address(seq, "PATCH", "data", data_body(seq.data))
        if not isinstance(reply, Reply):
            return reply
        if reply.ok:
            seq.data = {}
            return self._after_profile(seq)
        return self._refused(seq, reply, "setting the audience data")

    async def _events(self, seq: UserSequence) -> _Next:
        reply = await self._by_address(seq, "POST", "events", seq.events[seq.events_sent])
        if not isinstance(reply, Reply):
            return reply
        if reply.ok:
            seq.events_sent += 1
            return self._after_profile(seq)
        return self._refused(seq, reply, "adding the event")

    async def _not_found(self, seq: UserSequence) -> _Next:
        """404 ``people_not_found`` on a route addressed by ``seq.person``."""
        person = seq.person
        assert person is not None
        if person.people_id is None:
            if seq.exists:
                # Crisp just said the profile exists: its email is what it does not take.
                await self._learned(False, seq, seq.answers[-1])
            return Step.SEARCH  # either emails do not address profiles, or it was deleted
        return await self._gone(seq)

    async def _gone(self, seq: UserSequence) -> _Next:
        """The profile was deleted in Crisp: forget it; create it again if it must carry data."""
        await self.people.forget(seq.user_id)
        if not seq.sets:
            if seq.events_sent < len(seq.events):
                return Outcome.skipped(
                    seq.user_id, "dropped: the user's Crisp profile no longer exists"
                )
            return Outcome.delivered(seq.user_id)  # only `false` to set: nothing to unset
        if seq.visits.get(Step.CREATE):
            return self._gave_up(seq)  # the profile created this run vanished at once
        return Step.CREATE

    # -- endings -------------------------------------------------------------------------------

    def _gave_up(self, seq: UserSequence) -> Outcome:
        log.warning(
            "user_id=%s gave up after %d requests to Crisp this run: %s",
            seq.user_id,
            seq.requests,
            seq.trail(),
        )
        return Outcome.failed(
            seq.user_id,
            f"gave up after {seq.requests} requests to Crisp for this user in one run "
            f"(Crisp answered: {seq.trail()}); retried next run",
        )

    def _shared(self, seq: UserSequence, other: str) -> Outcome:
        """A second user_id on a profile another user_id already has (the same email)."""
        return Outcome.failed(
            seq.user_id,
            f"same email as user_id {other!r}, which already has this Crisp profile: Crisp "
            "keys a profile by email, so two user_ids cannot share one (the one leaving an "
            "audience would set `false` for both); give each user_id its own email or merge "
            "them in the source",
            retryable=False,
        )

    def _refused(self, seq: UserSequence, reply: Reply, doing: str) -> Outcome:
        """The outcome of a final answer that is not a success (or stop the run)."""
        verdict = reply.verdict
        if verdict is Verdict.TRANSIENT:
            return Outcome.failed(
                seq.user_id,
                f"{doing}: {reply.describe()} (retried; will retry next run)",
                status_code=reply.status or None,
            )
        if verdict is Verdict.WEBSITE:
            raise DestinationError(
                f"Crisp does not know website {self.client.website_id!r} ({reply.describe()}); "
                "check `website_id` / $CRISP_WEBSITE_ID"
            )
        if verdict is Verdict.REFUSED:
            if reply.status == 403:
                raise CredentialsError(
                    f"Crisp refused {reply.route} ({reply.describe()}); the run stopped. Two "
                    f"likely causes: website_id {self.client.website_id!r} is not a website this "
                    f"token may use (a typo, or another workspace's id), or the token lacks the "
                    f"scope (tier = {self.tier!r} must match a plugin or website token; a plugin "
                    "needs the people scopes and must be installed on the website). To tell "
                    "them apart: open app.crisp.chat/website/<website_id>/ and compare the id; "
                    "if it is right, the token's tier or scopes are at fault"
                )
            raise DestinationError(
                f"Crisp refused {reply.route} ({reply.describe()}); the run stopped"
            )
        return Outcome.failed(
            seq.user_id,
            f"{doing}: {reply.describe()}",
            retryable=False,
            status_code=reply.status or None,
        )
