"""One user's bounded request sequence against a strict loopback Crisp (issue 15).

The first test reproduces the loop a real user hit: a profile made by the chat widget, a
snapshot row with a ``name``, and a Crisp that does not take an email in place of a people_id.
Before the state machine, that user looped (create 409 -> profile PATCH by email 404 -> forget
-> create 409 ...) until ``RecursionError``, spending the day's quota; now it costs 5 requests
once, and 4 for every later such user (the lesson is kept in ``crisp_facts``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from crisp_server import CrispServer
from test_crisp_destination import Setup, counts, users

from audience_sync.destinations.crisp.classify import Verdict
from audience_sync.destinations.crisp.client import Reply
from audience_sync.destinations.crisp.people import Person
from audience_sync.destinations.crisp.profiles import (
    MAX_REQUESTS,
    Profiles,
    Step,
    UserSequence,
)
from audience_sync.destinations.crisp.tables import crisp_facts
from audience_sync.model import DeliveryStatus, Identity

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def s(tmp_path: Path, state_url: str, crisp: CrispServer, env: None) -> Iterator[Setup]:
    yield Setup(tmp_path, state_url, crisp)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import crisp_env

    for name, value in crisp_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CRISP_WEBSITE_ID", raising=False)


def routes(server: CrispServer) -> list[str]:
    """``METHOD /route status`` of every request, with ids and emails left out."""
    out = []
    for r in server.requests:
        parts = r.path.split("?")[0].split("/")[4:]  # after /v1/website/{id}/
        route = "/".join(p if "@" not in p and len(p) != 36 else "{id}" for p in parts)
        by = "email" if "@" in r.path.split("?")[0] else "id"
        if "{id}" in route:
            route += f" by {by}"
        out.append(f"{r.method} {route} {r.status}")
    return out


def test_existing_widget_profile_with_a_name_costs_a_bounded_sequence(s: Setup) -> None:
    s.server.email_as_people_id = False  # strict: emails are not people_ids
    for _, email in users(3):
        s.server.add_profile(email, person={"nickname": "Visitor"}, data={"seen": True})
    s.options = {"max_concurrency": 1}
    s.snapshot("VIP", [(u, e, f"Name {u}") for u, e in users(3)], header="user_id,email,name")
    result = s.sync("VIP")
    assert result.exit_code == 0, result.audiences[0].error
    assert routes(s.server) == [
        # the first user learns that emails do not address profiles: 5 requests, once
        "POST people/profile 409",
        "PATCH people/profile/{id} by email 404",
        "GET people/profiles/1 200",
        "PATCH people/profile/{id} by id 200",
        "PATCH people/data/{id} by id 200",
        # every later one searches directly: 4
        *[
            "POST people/profile 409",
            "GET people/profiles/1 200",
            "PATCH people/profile/{id} by id 200",
            "PATCH people/data/{id} by id 200",
        ]
        * 2,
    ]
    assert len(s.server.profiles) == 3
    for u, email in users(3):
        profile = s.server.profile_by_email(email)
        assert profile is not None
        assert profile["data"] == {"seen": True, "vip": True}
        assert profile["person"]["nickname"] == f"Name {u}"
    [fact] = s.rows("crisp_facts")
    assert (fact["fact"], fact["value"]) == ("email_addressing", False)

    # a later run remembers it: a new widget profile costs 4, a known one 1
    s.server.reset_counts()
    s.server.add_profile("u003@example.com", person={"nickname": "Visitor"})
    s.snapshot("VIP", [(u, e, f"Name {u}") for u, e in users(4)], header="user_id,email,name")
    assert s.sync("VIP").exit_code == 0
    assert s.server.count() == 4 and s.server.count("GET", "search_text") == 1


@pytest.mark.parametrize("email_as_people_id", [True, False])
def test_a_create_whose_answer_is_lost_resolves_the_created_profile(
    s: Setup, email_as_people_id: bool
) -> None:
    s.server.email_as_people_id = email_as_people_id
    s.server.lose_answer_next = 1  # Crisp creates the profile; the answer never arrives
    s.server.lose_answer_match = "POST"
    s.snapshot("VIP", [("u000", "u000@example.com", "Ann")], header="user_id,email,name")
    assert s.sync("VIP").exit_code == 0
    assert s.server.answers_lost == 1 and len(s.server.profiles) == 1
    assert s.data("u000@example.com") == {"vip": True}
    # the retried create answers 409; the profile is then addressed by email (2 more) or
    # found by a search after one 404 (4 more)
    assert s.server.count() == (4 if email_as_people_id else 6)
    assert s.server.count() - 1 <= MAX_REQUESTS  # the lost attempt is a retry of the create


def test_a_create_lost_to_a_kill_is_finished_by_the_next_run(s: Setup) -> None:
    """A run killed after Crisp created the profile, before its people_id was saved."""
    s.server.email_as_people_id = False
    s.options = {"max_retries": 0}  # the run gives up on the lost answer, like a kill
    s.server.lose_answer_next = 1
    s.server.lose_answer_match = "POST"
    s.snapshot("VIP", [("u000", "u000@example.com", "Ann")], header="user_id,email,name")
    first = s.sync("VIP")
    assert counts(first)["vip"]["failed"] == 1 and len(s.server.profiles) == 1
    s.server.reset_counts()
    assert s.sync("VIP").exit_code == 0
    assert len(s.server.profiles) == 1 and s.data("u000@example.com") == {"vip": True}
    assert s.server.count() == MAX_REQUESTS  # 409, 404 by email, search, profile, data


def test_a_user_crisp_answers_inconsistently_about_is_failed_and_the_run_goes_on(
    s: Setup,
) -> None:
    s.server.email_as_people_id = False
    s.server.add_profile("u000@example.com")
    # Crisp says the profile exists, but the search never finds it (an index lagging)
    s.snapshot("VIP", users(3))
    original = s.server._list_profiles
    s.server._list_profiles = lambda page, query: (200, "listed", [])  # type: ignore[method-assign]
    try:
        result = s.sync("VIP")
    finally:
        s.server._list_profiles = original  # type: ignore[method-assign]
    vip = counts(result)["vip"]
    assert (vip["delivered"], vip["failed"]) == (2, 1)
    [row] = [r for r in s.rows("sync_pending") if r["status"] == "failed"]
    assert row["user_id"] == "u000"
    assert "people_exists" in row["reason"] and "search does not find" in row["reason"]
    per_user = [
        r
        for r in s.server.requests
        if "u000" in r.path or (r.body or {}).get("email") == "u000@example.com"
    ]
    assert len(per_user) <= MAX_REQUESTS


# -- odd answers (item 8) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "shown"),
    [
        ("text/html", b"<!doctype html><title>Maintenance</title>", "text/html, b'<!doctype html>"),
        ("", b"", "no content type, an empty body"),
    ],
)
def test_a_create_answered_without_an_envelope_says_what_crisp_answered(
    s: Setup, content_type: str, body: bytes, shown: str
) -> None:
    s.server.raw_next = [(200, content_type, body)]
    s.snapshot("VIP", users(1))
    result = s.sync("VIP")
    assert counts(result)["vip"]["failed"] == 1
    [row] = s.rows("sync_pending")
    assert "without a people_id (HTTP 200 from POST /people/profile, " + shown in row["reason"]
    assert row["retryable"]
    assert s.sync("VIP").exit_code == 0  # the next run creates it
    assert s.data("u000@example.com") == {"vip": True}


def test_a_403_names_both_likely_causes(s: Setup) -> None:
    s.server.fail_next = [(403, "not_allowed")]
    s.snapshot("VIP", users(1))
    result = s.sync("VIP")
    error = result.audiences[0].error or ""
    assert result.exit_code == 6
    assert "website_id 'website-1'" in error and "scope" in error and "tier" in error
    assert "To tell them apart" in error


# -- two user_ids, one email (item 7) -------------------------------------------------------------


def test_two_user_ids_with_one_email_are_refused_not_merged(s: Setup) -> None:
    s.snapshot("VIP", [("a", "same@example.com"), ("b", "Same@example.com"), ("c", "c@x.io")])
    result = s.sync("VIP")
    vip = counts(result)["vip"]
    assert (vip["delivered"], vip["failed"]) == (2, 1)
    [row] = [r for r in s.rows("sync_pending") if r["status"] == "failed"]
    assert "same email as user_id" in row["reason"] and not row["retryable"]
    assert len(s.server.profiles) == 2
    owner = row["reason"].split("'")[1]
    # the owner leaving sets false: the profile is its alone; the other was reported, not merged
    s.snapshot(
        "VIP",
        [(u, e) for u, e in [("a", "same@example.com"), ("b", "Same@example.com")] if u != owner]
        + [("c", "c@x.io")],
    )
    s.sync("VIP")
    assert s.data("same@example.com") == {"vip": False}

    # across runs: a new user_id with an email another user_id already has in Crisp
    s.server.reset_counts()
    s.snapshot("Other", [("d", "c@x.io")])
    result = s.sync("Other")
    assert counts(result)["other"]["failed"] == 1
    assert s.data("c@x.io") == {"vip": True}
    assert s.server.count() == 1  # the create answered people_exists; nothing else sent


# -- the batch route (item 4) ---------------------------------------------------------------------


def test_a_refused_batch_route_costs_one_request_and_is_remembered(s: Setup) -> None:
    s.options = {"batch": True, "batch_size": 4, "batch_linger": 0.1, "max_concurrency": 8}
    s.snapshot("VIP", users(24))
    assert s.sync("VIP").exit_code == 0
    s.server.batch_enabled = False
    s.server.reset_counts()
    s.snapshot("VIP", [])
    assert s.sync("VIP").exit_code == 0
    # six batches were ready at once; one refused request, then per-user updates
    assert s.server.count("PATCH", "/batch/data") == 1
    assert s.server.count("PATCH", "/people/data/") == 24
    refused = [r for r in s.rows("crisp_facts") if r["fact"] == "batch_refused"]
    assert refused and refused[0]["value"]

    s.server.reset_counts()
    s.snapshot("VIP", users(24))
    assert s.sync("VIP").exit_code == 0
    assert s.server.count("PATCH", "/batch/data") == 0  # remembered: not tried again

    # a day later it is tried again (the token's scopes may have changed)
    engine = sa.create_engine(s.state_url)
    with engine.begin() as conn:
        conn.execute(crisp_facts.update().values(learned_at=datetime(2000, 1, 1, tzinfo=UTC)))
    engine.dispose()
    s.server.batch_enabled = True
    s.server.reset_counts()
    s.snapshot("VIP", [])
    assert s.sync("VIP").exit_code == 0
    assert s.server.count("PATCH", "/batch/data") == 6 and s.server.count("/people/data/") == 0


def test_a_changed_config_tries_a_refused_batch_route_again(s: Setup) -> None:
    s.options = {"batch": True, "batch_size": 4, "batch_linger": 0.1}
    s.snapshot("VIP", users(4))
    s.server.batch_enabled = False
    assert s.sync("VIP").exit_code == 0
    s.server.batch_enabled = True
    s.options["batch_size"] = 5
    s.server.reset_counts()
    s.snapshot("VIP", [])
    assert s.sync("VIP").exit_code == 0
    assert s.server.count("PATCH", "/batch/data") == 1


# -- the quota (item 3) ---------------------------------------------------------------------------


def test_the_quota_is_spent_on_users_it_can_finish(s: Setup) -> None:
    s.options = {"daily_request_budget": 7}
    s.snapshot("VIP", users(10))
    result = s.sync("VIP")
    vip = counts(result)["vip"]
    # before: 7 creates and no user finished; now 3 finished (create + data), 7 deferred
    assert (vip["delivered"], vip["pending"], vip["failed"]) == (3, 7, 0)
    assert s.server.count() == 6 and len(s.server.profiles) == 3
    assert "7 users deferred, not started" in (result.audiences[0].error or "")

    # a deferred entry that is undone before it was sent is dropped, not sent
    engine = sa.create_engine(s.state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE destination_requests SET day = '2000-01-01'"))
    engine.dispose()
    s.server.reset_counts()
    delivered = {u for u, _ in users(10) if s.server.profile_by_email(f"{u}@example.com")}
    s.snapshot("VIP", [(u, e) for u, e in users(10) if u in delivered or u == "u009"])
    assert s.sync("VIP").exit_code == 0
    assert len(s.server.profiles) == 4 and s.server.count() == 2  # only u009 was sent


def test_a_user_who_would_pass_the_limits_is_failed_with_crisp_answers(s: Setup) -> None:
    # A Crisp whose profile route says "not found" for a profile that its search finds.
    s.server.add_profile("u000@example.com")
    s.snapshot("VIP", [(u, e, "Ann") for u, e in users(2)], header="user_id,email,name")
    s.options = {"max_concurrency": 1}
    original = s.server._profile

    def profile(method: str, arg: str, body: Any) -> tuple[int, str, Any]:
        if "u000" in arg or arg == s.server.profile_by_email("u000@example.com")["people_id"]:  # type: ignore[index]
            return original("DELETE", "nobody@example.com", None)  # 404 people_not_found
        return original(method, arg, body)

    s.server._profile = profile  # type: ignore[method-assign]
    try:
        result = s.sync("VIP")
    finally:
        s.server._profile = original  # type: ignore[method-assign]
    vip = counts(result)["vip"]
    assert (vip["delivered"], vip["failed"]) == (1, 1)  # the run went on with u001
    [row] = [r for r in s.rows("sync_pending") if r["status"] == "failed"]
    assert row["user_id"] == "u000" and row["retryable"]
    assert row["reason"].startswith("gave up after 4 requests to Crisp for this user")
    assert "409 from POST /people/profile; 404 from PATCH /people/profile" in row["reason"]
    assert s.server.count() == 4 + 2  # u000's four, then u001: create + data


# -- events and continued sequences ---------------------------------------------------------------


def test_a_user_entering_three_audiences_at_once_gets_three_events_once(s: Setup) -> None:
    s.options = {"audience_events": True}
    for name in ("VIP", "Churn Risk", "Trial"):
        s.snapshot(name, users(1))
    result = s.sync("VIP", "Churn Risk", "Trial")
    assert result.exit_code == 0, [a.error for a in result.audiences]
    assert all(c["delivered"] == 1 and c["failed"] == 0 for c in counts(result).values())
    profile = s.server.profile_by_email("u000@example.com")
    assert profile is not None
    assert [e["text"] for e in profile["events"]] == ["Audience Entered"] * 3
    assert s.data("u000@example.com") == {"vip": True, "churn_risk": True, "trial": True}
    assert s.server.count("POST", "/people/events/") == 3
    s.server.reset_counts()
    assert s.sync("VIP", "Churn Risk", "Trial").exit_code == 0
    assert s.server.count() == 0  # delivered: nothing is sent again


class _FakeClient:
    """Answers by route: the profile ``gone`` is deleted in Crisp; a create makes ``new``."""

    website_id = "w"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def call(self, method: str, path: str, *, route: str, **kw: Any) -> Reply:
        self.calls.append((method, path, kw.get("json")))
        if path.endswith("/gone"):
            return Reply(route, 404, "people_not_found", {}, Verdict.NOT_FOUND)
        if method == "POST" and path == "/people/profile":
            return Reply(route, 201, "added", {"people_id": "new"}, Verdict.OK)
        return Reply(route, 200, "updated", {}, Verdict.OK)


class _FakePeople:
    def __init__(self) -> None:
        self.saved: dict[str, Person] = {}

    async def save(self, user_id: str, person: Person) -> None:
        self.saved[user_id] = person

    async def forget(self, user_id: str) -> None:
        self.saved.pop(user_id, None)

    def owner_of(self, email: str, other_than: str) -> str | None:
        return None


def test_a_continued_sequence_sends_its_data_to_a_recreated_profile() -> None:
    """A batch that fell back continues at SET_DATA with ``stop_before_data`` still set; the
    profile was deleted in Crisp meanwhile: the data goes to the new one, not nowhere."""
    client, people = _FakeClient(), _FakePeople()
    profiles = Profiles(client, people, update_profiles=False, tier="plugin")  # type: ignore[arg-type]
    seq = UserSequence(
        "u000",
        Identity("u000@example.com"),
        Person("gone", "u000@example.com"),
        data={"vip": True},
        stop_before_data=True,
    )
    outcome = asyncio.run(profiles.run(seq, Step.SET_DATA))
    assert not isinstance(outcome, Person)
    assert outcome.status is DeliveryStatus.DELIVERED
    assert [(m, p) for m, p, _ in client.calls] == [
        ("PATCH", "/people/data/gone"),
        ("POST", "/people/profile"),
        ("PATCH", "/people/data/new"),
    ]
    assert client.calls[-1][2] == {"data": {"vip": True}}
    assert people.saved["u000"].people_id == "new"
