"""The requests behind one user's Identify: find or create the profile, update it, set data.

Costs, in requests (the currency under a daily quota):
- known profile (people_id or email in ``crisp_people``): 1, the data ``PATCH``;
- new user: 2, ``POST /people/profile`` (people_id saved at once) then the data ``PATCH``;
- profile that already exists in Crisp (made by the chat widget): the create answers
  ``people_exists``, then the data ``PATCH`` addresses it by email: 2; when Crisp does not
  accept an email in place of a people_id (unverified, CRISP.md) one search finds the people_id:
  3, and the rest of the run searches directly;
- ``+1`` when ``update_profiles`` and the user's email/name/phone/avatar differ from what Crisp
  was last sent (never in steady state).
No request is made for a user who cannot be sent (no profile and no email).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.client import CrispClient, Reply, segment
from audience_sync.destinations.crisp.payloads import (
    DataValue,
    card_hash,
    data_body,
    profile_card,
)
from audience_sync.destinations.crisp.people import PeopleMap, Person
from audience_sync.errors import CredentialsError, DestinationError
from audience_sync.model import Identity, Outcome

__all__ = ["EMAIL_REQUIRED", "Profiles"]

log = logging.getLogger("audience_sync.crisp")

EMAIL_REQUIRED = "email required to create a Crisp profile"
#: Seconds an existing profile waits for the first one to learn whether emails address profiles.
PROBE_WAIT = 10.0


class Profiles:
    """Per-user request sequences, sharing one client and what the run learned."""

    def __init__(
        self, client: CrispClient, people: PeopleMap, *, update_profiles: bool, tier: str
    ) -> None:
        self.client = client
        self.people = people
        self.update_profiles = update_profiles
        self.tier = tier
        self.email_addressing: bool | None = None
        """Whether Crisp accepts an email in place of a people_id (None: not seen yet)."""
        # The first existing profile finds that out; the others wait for its answer a moment
        # instead of each spending a request on the same question.
        self._probe: asyncio.Event | None = None
        self._prober: str | None = None

    def _learned(self, accepted: bool | None) -> None:
        if accepted is not None:
            if self.email_addressing is None and not accepted:
                log.info("Crisp does not accept an email in place of people_id; searching instead")
            self.email_addressing = accepted
        if self._probe is not None:
            self._probe.set()

    # -- profile --------------------------------------------------------------------------

    def needs_update(self, identity: Identity, person: Person) -> bool:
        """Whether the profile card differs from what Crisp was last sent (or found)."""
        if not self.update_profiles:
            return False
        card = profile_card(identity)
        if not card or card_hash(card) == person.profile_hash:
            return False
        return bool(card.get("person")) or card.get("email") != person.email

    async def ensure(
        self, user_id: str, identity: Identity, person: Person | None
    ) -> Person | Outcome:
        """The user's profile, created or resolved if unknown and updated if changed."""
        if person is None or person.address is None:
            if not identity.email:
                return Outcome.skipped(user_id, EMAIL_REQUIRED)
            found = await self.create_or_resolve(user_id, identity)
            if isinstance(found, Outcome):
                return found
            person = found
        if self.needs_update(identity, person):
            return await self._update(user_id, identity, person)
        return person

    async def create_or_resolve(self, user_id: str, identity: Identity) -> Person | Outcome:
        assert identity.email
        card = profile_card(identity)
        reply = await self.client.call(
            "POST", "/people/profile", route="POST /people/profile", json=card
        )
        if reply.ok:
            people_id = reply.data.get("people_id") if isinstance(reply.data, dict) else None
            if not isinstance(people_id, str) or not people_id:
                return Outcome.failed(
                    user_id,
                    f"Crisp created a profile but returned no people_id ({reply.describe()})",
                )
            person = Person(people_id, identity.email, card_hash(card))
            await self.people.save(user_id, person)
            return person
        if reply.verdict is Verdict.CONFLICT:
            return await self.resolve_existing(user_id, identity.email)
        return self._refused(user_id, reply, "creating the profile")

    async def resolve_existing(self, user_id: str, email: str) -> Person | Outcome:
        """A profile with ``email`` exists (e.g. made by the chat widget): address it."""
        found_card = card_hash({"email": email})
        if self.email_addressing is None:
            if self._probe is None:
                self._probe, self._prober = asyncio.Event(), user_id
            elif self._prober != user_id:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe.wait(), PROBE_WAIT)
        if self.email_addressing is not False:
            # Tentative: the data update confirms that Crisp takes the email (or we search).
            person = Person(None, email, found_card)
            await self.people.save(user_id, person)
            return person
        found = await self.search(user_id, email)
        if found is None:
            return Outcome.failed(
                user_id,
                "Crisp says a profile with this email exists but search does not find it yet",
            )
        return found

    async def search(self, user_id: str, email: str) -> Person | Outcome | None:
        """The profile whose email is ``email`` (people_id saved), or None if there is none."""
        reply = await self.client.call(
            "GET",
            "/people/profiles/1",
            route="GET /people/profiles",
            params={"search_text": email},
        )
        if not reply.ok:
            return self._refused(user_id, reply, "searching the profile by email")
        for item in reply.data if isinstance(reply.data, list) else []:
            if (
                isinstance(item, dict)
                and str(item.get("email", "")).lower() == email.lower()
                and item.get("people_id")
            ):
                person = Person(
                    str(item["people_id"]), str(item["email"]), card_hash({"email": item["email"]})
                )
                await self.people.save(user_id, person)
                return person
        return None

    async def _update(self, user_id: str, identity: Identity, person: Person) -> Person | Outcome:
        assert person.address is not None
        card = profile_card(identity)
        reply = await self.client.call(
            "PATCH",
            f"/people/profile/{segment(person.address)}",
            route="PATCH /people/profile",
            json=card,
        )
        if reply.ok:
            email = card.get("email", person.email)
            # Addressed by email and the email changed: the new one addresses it from now on.
            updated = Person(person.people_id, email, card_hash(card))
            await self.people.save(user_id, updated)
            return updated
        if reply.verdict is Verdict.NOT_FOUND:
            await self.people.forget(user_id)
            if identity.email:
                return await self.ensure(user_id, identity, None)
            return Outcome.skipped(user_id, f"the Crisp profile no longer exists; {EMAIL_REQUIRED}")
        if reply.verdict in (Verdict.PERMANENT, Verdict.CONFLICT):
            # The membership matters more than the card: send the data anyway, try the card
            # again when the identity changes next.
            log.warning(
                "user_id=%s profile update refused (%s); audience data is sent anyway",
                user_id,
                reply.describe(),
            )
            return person
        return self._refused(user_id, reply, "updating the profile")

    # -- data and events ---------------------------------------------------------------------

    async def set_data(
        self,
        user_id: str,
        identity: Identity,
        person: Person,
        data: Mapping[str, DataValue],
        *,
        second_chance: bool = True,
    ) -> Outcome:
        """Merge ``data`` into the profile's custom data (PATCH, never PUT: PUT wipes the rest)."""
        try:
            return await self._set_data(user_id, identity, person, data, second_chance)
        finally:
            if user_id == self._prober:
                self._learned(None)  # whatever happened, do not keep the others waiting

    async def _set_data(
        self,
        user_id: str,
        identity: Identity,
        person: Person,
        data: Mapping[str, DataValue],
        second_chance: bool,
    ) -> Outcome:
        assert person.address is not None
        reply = await self.client.call(
            "PATCH",
            f"/people/data/{segment(person.address)}",
            route="PATCH /people/data",
            json=data_body(data),
        )
        if reply.ok:
            if person.people_id is None:
                self._learned(True)
            return Outcome.delivered(user_id)
        if reply.verdict is not Verdict.NOT_FOUND:
            return self._refused(user_id, reply, "setting the audience data")
        if not second_chance:
            return Outcome.failed(
                user_id, f"the Crisp profile cannot be found ({reply.describe()})"
            )
        found: Person | Outcome | None = None
        if person.people_id is None and person.email:
            # Addressed by email and "not found": Crisp may not take emails here; search.
            found = await self.search(user_id, person.email)
            if isinstance(found, Person):
                self._learned(False)
        if isinstance(found, Outcome):
            return found
        if found is None:
            await self.people.forget(user_id)  # deleted in Crisp
            if not any(data.values()):
                return Outcome.delivered(user_id)  # only `false` to set: nothing to unset
            email = identity.email or person.email
            if not email:
                return Outcome.skipped(
                    user_id, f"the Crisp profile no longer exists; {EMAIL_REQUIRED}"
                )
            created = await self.create_or_resolve(user_id, replace(identity, email=email))
            if isinstance(created, Outcome):
                return created
            found = created
        return await self._set_data(user_id, identity, found, data, False)

    async def add_events(
        self, user_id: str, person: Person, events: Sequence[dict[str, Any]]
    ) -> Outcome:
        assert person.address is not None
        for body in events:
            reply = await self.client.call(
                "POST",
                f"/people/events/{segment(person.address)}",
                route="POST /people/events",
                json=body,
            )
            if reply.verdict is Verdict.NOT_FOUND:
                return Outcome.skipped(
                    user_id, "dropped: the user's Crisp profile no longer exists"
                )
            if not reply.ok:
                return self._refused(user_id, reply, "adding the event")
        return Outcome.delivered(user_id)

    # -- errors ---------------------------------------------------------------------------

    def _refused(self, user_id: str, reply: Reply, doing: str) -> Outcome:
        """The outcome of a final answer that is not a success (or stop the run)."""
        verdict = reply.verdict
        if verdict is Verdict.TRANSIENT:
            return Outcome.failed(
                user_id,
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
                    f"Crisp refused {reply.route} ({reply.describe()}): the token is not allowed "
                    f"to do this; check that tier = {self.tier!r} matches the token (plugin or "
                    "website token) and that the plugin has the people scopes; the run stopped"
                )
            raise DestinationError(
                f"Crisp refused {reply.route} ({reply.describe()}); the run stopped"
            )
        return Outcome.failed(
            user_id,
            f"{doing}: {reply.describe()}",
            retryable=False,
            status_code=reply.status or None,
        )
