"""A stateful model test of the Crisp destination (issue 15): hypothesis drives the real ``sync``
against the strict loopback Crisp server over runs, in combinations of how Crisp may behave
(emails accepted as people_id or not, the batch route present or refused, 409 or 400 for a
duplicate email), what the world does between runs (profiles made by the chat widget with
mixed-case emails and a name/phone/avatar, a profile deleted in Crisp, a user whose email
changes, memberships changing) and faults during a run (5xx, 429 with and without
``Retry-After``, timeouts, requests Crisp carried out whose answer never arrives, a run cut
between two requests of one user: the network goes and the run is stopped).

Invariants after every run: no profile without an email, no two profiles for one user, never
more than the cap of requests per user in one run, the day's requests within
``daily_request_budget``. After the dust settles (faults off, runs until one succeeds): every
user with an email carries exactly the snapshot's traits in Crisp's data, and the state agrees
with Crisp. This test catches the request loop of issue 15 (a widget profile + a name + emails
not accepted) as a user over the cap.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import sqlalchemy as sa
from conftest import crisp_destination, crisp_env, write_config
from crisp_server import CrispServer
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from audience_sync import load_config, sync
from audience_sync.destinations.budget import destination_requests
from audience_sync.destinations.crisp import CrispDestination
from audience_sync.destinations.crisp.profiles import MAX_REQUESTS
from audience_sync.destinations.crisp.tables import crisp_people
from audience_sync.state import connect
from audience_sync.state.schema import sync_audiences, sync_members

pytestmark = pytest.mark.timeout(900)

USERS = [f"u{i}" for i in range(6)]
NO_EMAIL = "u5"
AUDIENCES = ("VIP", "Churn")
KEYS = {"VIP": "vip", "Churn": "churn"}
#: Bounded for CI on a loaded 2-core machine: each example is a few real syncs.
MAX_EXAMPLES = 15
BUDGET = 120  # requests per day: several runs fit, a quota stop is possible
_runs = itertools.count()


class CutTransport(httpx.AsyncBaseTransport):
    """The network goes away after ``left`` requests (a kill between two requests of a user)."""

    def __init__(self, left: int | None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.left = left

    @property
    def cut(self) -> bool:
        return self.left is not None and self.left <= 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.left is not None:
            if self.left <= 0:
                raise httpx.ConnectError("the network went away")
            self.left -= 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CrispModel(RuleBasedStateMachine):
    state_url: str
    folder: Path
    syncs = 0
    seen: ClassVar[set[tuple[bool, bool]]] = set()
    """(emails accepted as id, widget profiles and rows with names) combinations run."""

    def __init__(self) -> None:
        super().__init__()
        self.server = CrispServer(
            website_id=f"w{uuid.uuid4().hex[:10]}",
            identifier=crisp_env()["CRISP_IDENTIFIER"],
            key=crisp_env()["CRISP_KEY"],
            seed=next(_runs),
        ).start()
        self.dir = self.folder / self.server.website_id
        self.dir.mkdir()
        self.options: dict[str, Any] = {
            "max_retries": 2,
            "timeout": 0.5,
            "daily_request_budget": BUDGET,
            "batch_size": 3,
            "batch_linger": 0.05,
            "rate_limit_patience": 30.0,
        }
        self.members: dict[str, set[str]] = {a: set() for a in AUDIENCES}
        self.ever: dict[str, set[str]] = {u: set() for u in USERS}  # audiences a user was in
        self.email = {u: f"{u}@example.com" for u in USERS if u != NO_EMAIL}
        self.emails_of: dict[str, set[str]] = {u: set() for u in self.email}
        """The emails each user had when a run sent it (its profile has one of them)."""
        self.names: dict[str, str] = {}
        self.day = 0
        self.stale: set[str] = set()
        self.pid_owner: dict[str, str] = {}
        self._people_rows: list[Any] = []

    # -- setup -----------------------------------------------------------------------------------

    @initialize(
        # The simplest draws come first: emails not taken as ids, widget profiles, rows with
        # names (the loop of issue 15) is the first case tried.
        email_id=st.sampled_from([False, True]),
        batch=st.booleans(),
        batch_route=st.booleans(),
        conflict=st.sampled_from([409, 400]),
        widget=st.lists(
            st.tuples(
                st.sampled_from([u for u in USERS if u != NO_EMAIL]),
                st.sampled_from(["lower", "upper", "title"]),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "nickname": st.just("Visitor"),
                        "phone": st.just("+33100000000"),
                        "avatar": st.just("https://example.com/a.png"),
                    },
                ),
            ),
            min_size=1,
            max_size=4,
            unique_by=lambda t: t[0],
        ),
        names=st.sampled_from([True, False]),
    )
    def setup(
        self,
        email_id: bool,
        batch: bool,
        batch_route: bool,
        conflict: int,
        widget: list[tuple[str, str, dict[str, str]]],
        names: bool,
    ) -> None:
        self.server.email_as_people_id = email_id
        self.server.batch_enabled = batch_route
        self.server.conflict_status = conflict
        self.options["batch"] = batch
        for user, case, person in widget:
            email = getattr(self.email[user], case)()
            self.server.add_profile(email, person=person, data={"seen": True})
        # Rows with a name: with a widget profile and emails not taken as ids, the loop of
        # issue 15 (create 409 -> profile PATCH by email 404 -> create ...).
        self.names = {u: f"Name {u}" for u in USERS} if names else {}
        self.members["VIP"] = set(USERS)  # the first sync sends everyone
        CrispModel.seen.add((email_id, bool(widget) and names))

    # -- the world between runs ------------------------------------------------------------------

    @rule(audience=st.sampled_from(AUDIENCES), users=st.sets(st.sampled_from(USERS)))
    def change_audience(self, audience: str, users: set[str]) -> None:
        self.members[audience] = set(users)

    @rule(user=st.sampled_from([u for u in USERS if u != NO_EMAIL]))
    def change_email(self, user: str) -> None:
        self.email[user] = f"{user}.{len(self.emails_of[user])}{self.day}@Example.com"

    @rule(user=st.sampled_from([u for u in USERS if u != NO_EMAIL]))
    def delete_profile(self, user: str) -> None:
        """Deleted in Crisp: audience-sync learns it only when it next sends to the user (the
        traits that did not change since are not sent again: ``run --full`` re-sends them)."""
        for people_id in self.profiles_of(user):
            self.server.profiles.pop(people_id, None)
            self.stale.add(user)

    @rule()
    def next_day(self) -> None:
        self.day += 1
        self.server.reset_quota()
        engine = sa.create_engine(self.state_url)
        try:
            with engine.begin() as conn:
                if not sa.inspect(conn).has_table("destination_requests"):
                    return  # no run yet
                conn.execute(
                    destination_requests.update()
                    .where(
                        destination_requests.c.destination == self.destination,
                        destination_requests.c.day == datetime.now(UTC).date(),
                    )
                    .values(day=date(2000, 1, 1) + timedelta(days=self.day))
                )
        finally:
            engine.dispose()

    # -- runs ------------------------------------------------------------------------------------

    @rule(
        errors=st.sampled_from([0.0, 0.0, 0.15]),
        lost=st.sampled_from([0.0, 0.0, 0.15]),
        slow=st.sampled_from([0.0, 0.0, 0.1]),
        limit=st.sampled_from([None, None, 15]),
        retry_after=st.booleans(),
        cut_after=st.one_of(st.none(), st.none(), st.integers(1, 12)),
    )
    def run(
        self,
        errors: float,
        lost: float,
        slow: float,
        limit: int | None,
        retry_after: bool,
        cut_after: int | None,
    ) -> None:
        srv = self.server
        srv.error_rate, srv.lose_answer_rate, srv.slow_answer_rate = errors, lost, slow
        srv.slow_answer_seconds = 0.8  # the client waits 0.5 s
        srv.rate_limit_per_second, srv.send_retry_after = limit, retry_after
        srv.retry_after_seconds = 1 if retry_after else None
        try:
            self.sync(cut_after)
        finally:
            srv.error_rate = srv.lose_answer_rate = srv.slow_answer_rate = 0.0
            srv.rate_limit_per_second = None

    @rule()
    def settle(self) -> None:
        """Faults off, a fresh day: runs until one succeeds; then Crisp has exactly the model."""
        for _ in range(3):
            self.next_day()
            result = self.sync(None)
            if all(r.counts["failed"] == r.counts["pending"] == 0 for r in result.audiences):
                break  # everything delivered (the user without an email is skipped)
        else:
            raise AssertionError("three clean runs did not finish the sync")
        self.check_settled()

    def sync(self, cut_after: int | None) -> Any:
        for u, email in self.email.items():
            if self.ever[u] or any(u in m for m in self.members.values()):
                self.emails_of[u].add(email.lower())
        for audience in AUDIENCES:
            rows = ["user_id,email,name"]
            for u in sorted(self.members[audience]):
                rows.append(f"{u},{self.email.get(u, '')},{self.names.get(u, '')}")
            (self.dir / f"{audience}.csv").write_text("\n".join(rows) + "\n")
        path = write_config(
            self.dir / "audience-sync.toml",
            state_url=self.state_url,
            destination=crisp_destination(self.server, **self.options),
            audiences=[{"name": a, "source": f"{a}.csv"} for a in AUDIENCES],
        )
        config = load_config(path)
        CrispModel.syncs += 1
        transport = CutTransport(cut_after)
        engine = connect(config.state.url)
        try:
            destination = CrispDestination(
                config.destination.settings,
                name=config.destination.name,
                state=engine,
                config_dir=self.dir,
                env=crisp_env(),
                transport=transport,
            )
            before = len(self.server.requests)
            self.remember_owners()
            result = sync(
                config, force=True, destination=destination, should_stop=lambda: transport.cut
            )
        finally:
            engine.dispose()
        assert result.exit_code in (0, 5), [(r.status, r.error) for r in result.audiences]
        for a in AUDIENCES:
            for u in self.members[a]:
                self.ever[u].add(a)
        self.remember_owners()
        self.check_run(self.server.requests[before:])
        return result

    def remember_owners(self) -> None:
        """Whose each profile is, also after it is deleted (to count a user's requests)."""
        for u in self.emails_of:
            for pid in self.profiles_of(u):
                self.pid_owner[pid] = u
        self.pid_owner |= self.known_people_ids()

    @property
    def destination(self) -> str:
        return f"crisp:{self.server.website_id}"

    # -- invariants ------------------------------------------------------------------------------

    def profiles_of(self, user: str) -> list[str]:
        emails = self.emails_of.get(user, set())
        return [
            pid for pid, p in list(self.server.profiles.items()) if p["email"].lower() in emails
        ]

    @invariant()
    def no_profile_without_email_and_no_duplicates(self) -> None:
        emails = [p["email"].lower() for p in list(self.server.profiles.values())]
        assert all(emails) and len(emails) == len(set(emails))
        for u in self.emails_of:
            assert len(self.profiles_of(u)) <= 1, (u, self.profiles_of(u))

    def check_run(self, requests: list[Any]) -> None:
        """Per user, at most the cap of answered requests (retries of one are not answers)."""
        per_user: dict[str, int] = {}
        for r in requests:
            if r.status in (0, 420, 429) or r.status >= 500:
                continue
            owner = self.owner(r, self.pid_owner)
            if owner is not None:
                per_user[owner] = per_user.get(owner, 0) + 1
        assert all(n <= MAX_REQUESTS for n in per_user.values()), per_user
        assert self.server.quota_used <= BUDGET, self.server.quota_used

    def owner(self, r: Any, people: dict[str, str]) -> str | None:
        text = r.path.lower()
        if isinstance(r.body, dict) and isinstance(r.body.get("email"), str):
            text += " " + r.body["email"].lower()
        for u, emails in self.emails_of.items():
            if any(e in text for e in emails):
                return u
        for pid, u in people.items():
            if pid in text:
                return u
        return None

    def known_people_ids(self) -> dict[str, str]:
        engine = sa.create_engine(self.state_url)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("crisp_people"):
                    return {}
                rows = conn.execute(
                    sa.select(crisp_people).where(crisp_people.c.destination == self.destination)
                ).all()
        finally:
            engine.dispose()
        self._people_rows = rows
        return {r.people_id: r.user_id for r in rows if r.people_id}

    def check_settled(self) -> None:
        self.known_people_ids()
        for u in USERS:
            keys = {KEYS[a]: u in self.members[a] for a in self.ever[u]}
            found = self.profiles_of(u) if u in self.emails_of else []
            if u == NO_EMAIL or u in self.stale or (not any(keys.values()) and not found):
                continue  # no profile needed (or only `false` to set), or deleted behind its back
            assert len(found) == 1, (u, keys)
            data = self.server.profiles[found[0]]["data"]
            assert {k: v for k, v in data.items() if k in KEYS.values()} == keys, (u, data)
        # the state agrees with Crisp: the members it records are the snapshot's (but the user
        # without an email, skipped), and every people_id it keeps is the profile of its user
        engine = sa.create_engine(self.state_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(sync_audiences.c.audience_key, sync_members.c.user_id)
                    .join(sync_members, sync_members.c.audience_id == sync_audiences.c.id)
                    .where(sync_audiences.c.destination == self.destination)
                ).all()
        finally:
            engine.dispose()
        for a in AUDIENCES:
            recorded = {u for key, u in rows if key == KEYS[a]}
            assert recorded == self.members[a] - {NO_EMAIL}, (a, recorded)
        for row in self._people_rows:
            if row.people_id is not None and row.people_id in self.server.profiles:
                assert self.server.profiles[row.people_id]["email"].lower() in self.emails_of.get(
                    row.user_id, set()
                )

    def teardown(self) -> None:
        try:
            self.settle()  # after the dust settles, whatever the steps were
        finally:
            self.server.stop()


def test_crisp_destination_model(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in crisp_env().items():
        monkeypatch.setenv(name, value)
    CrispModel.state_url = state_url
    CrispModel.folder = tmp_path
    CrispModel.syncs, CrispModel.seen = 0, set()
    run_state_machine_as_test(
        CrispModel,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            # No shrinking: each step is a real sync, and shrinking one failure took minutes;
            # the failing steps are printed as they were generated.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(f"model: {CrispModel.syncs} syncs, combinations {sorted(CrispModel.seen)}")
    assert (False, True) in CrispModel.seen  # the loop of issue 15 was among the cases
