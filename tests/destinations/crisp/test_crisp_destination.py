"""The Crisp destination end to end through the library API (``sync``, ``track``), against the
loopback Crisp server over real sockets, with the state on SQLite and PostgreSQL.

What is counted here is requests: under Crisp's daily quota they are the cost of a sync.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import CRISP_IDENTIFIER, CRISP_KEY, crisp_destination, crisp_env, write_config
from crisp_server import CrispServer

from audience_sync import (
    CredentialsError,
    IdentifyCall,
    RunStatus,
    SyncResult,
    TrackEvent,
    load_config,
    sync,
    track,
)
from audience_sync.destinations.crisp import EMAIL_REQUIRED, TRACK_DROPPED

pytestmark = pytest.mark.timeout(120)


class Setup:
    """One test's config, snapshots and state database, pointed at the loopback server."""

    def __init__(self, tmp_path: Path, state_url: str, server: CrispServer) -> None:
        self.dir = tmp_path
        self.state_url = state_url
        self.server = server
        self.options: dict[str, Any] = {}

    def snapshot(
        self, name: str, rows: list[tuple[str, ...]], header: str = "user_id,email"
    ) -> None:
        lines = [header, *(",".join(r) for r in rows)]
        (self.dir / f"{name}.csv").write_text("\n".join(lines) + "\n")

    def config(self, *audiences: str, **options: Any) -> Path:
        return write_config(
            self.dir / "audience-sync.toml",
            state_url=self.state_url,
            destination=crisp_destination(self.server, **(self.options | options)),
            audiences=[{"name": a, "source": f"{a}.csv"} for a in audiences],
        )

    def sync(self, *audiences: str, **kwargs: Any) -> SyncResult:
        # These tests exercise the destination, so audiences may empty out freely; the
        # safeguards that would refuse that have their own tests (test_safeguards.py).
        kwargs.setdefault("force", True)
        return sync(load_config(self.config(*audiences)), **kwargs)

    def rows(self, table: str) -> list[dict[str, Any]]:
        engine = sa.create_engine(self.state_url)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table(table):
                    return []
                return [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings()]
        finally:
            engine.dispose()

    def data(self, email: str) -> dict[str, Any]:
        profile = self.server.profile_by_email(email)
        assert profile is not None, email
        return dict(profile["data"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in crisp_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CRISP_WEBSITE_ID", raising=False)


@pytest.fixture
def s(tmp_path: Path, state_url: str, crisp: CrispServer, env: None) -> Iterator[Setup]:
    yield Setup(tmp_path, state_url, crisp)


def users(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"u{i:03}", f"u{i:03}@example.com") for i in range(start, start + n)]


def counts(result: SyncResult) -> dict[str, dict[str, Any]]:
    return {r.audience.trait_key: {"status": r.status.value, **r.counts} for r in result.audiences}


# -- the steady path ------------------------------------------------------------------------------


def test_initial_then_incremental_sync_costs_one_request_per_changed_user(s: Setup) -> None:
    s.snapshot("VIP", users(10))
    s.snapshot("Churn Risk", users(6, start=6))  # u006..u009 are in both audiences
    result = s.sync("VIP", "Churn Risk")
    assert result.exit_code == 0
    assert {k: v["status"] for k, v in counts(result).items()} == {
        "vip": "succeeded",
        "churn_risk": "succeeded",
    }
    # a new user costs 2 requests: create + one data update with all of its traits
    assert s.server.count("POST", "/people/profile") == 12
    assert s.server.count("PATCH", "/people/data/") == 12
    assert s.server.count() == 24
    assert s.data("u007@example.com") == {"vip": True, "churn_risk": True}
    assert s.data("u000@example.com") == {"vip": True}
    assert s.data("u011@example.com") == {"churn_risk": True}
    assert len(s.rows("crisp_people")) == 12

    # day 2: 2 enter VIP, 3 leave VIP, one user leaves Churn Risk and enters VIP
    s.server.reset_counts()
    s.snapshot("VIP", users(7) + users(3, start=10))  # u007-9 left, u010-12 entered
    s.snapshot("Churn Risk", users(5, start=6) + users(1, start=12))  # u011 left
    result = s.sync("VIP", "Churn Risk")
    assert result.exit_code == 0
    changed = {"u007", "u008", "u009", "u010", "u011", "u012"}
    assert s.server.count() == len(changed) + 1  # u012 is new: created, then 1 update
    assert s.server.count("PATCH", "/people/data/") == len(changed)
    assert s.data("u007@example.com") == {"vip": False, "churn_risk": True}
    assert s.data("u011@example.com") == {"churn_risk": False, "vip": True}
    assert s.data("u012@example.com") == {"vip": True, "churn_risk": True}
    assert s.server.count("PUT") == 0  # PUT would wipe other data: never used

    s.server.reset_counts()
    assert s.sync("VIP", "Churn Risk").exit_code == 0
    assert s.server.count() == 0  # nothing changed, nothing sent


def test_patch_merges_with_data_from_other_tools(s: Setup) -> None:
    s.server.add_profile("u000@example.com", data={"plan": "pro", "other_tool": True})
    s.snapshot("VIP", users(1))
    assert s.sync("VIP").exit_code == 0
    assert s.data("u000@example.com") == {"plan": "pro", "other_tool": True, "vip": True}


def test_identity_traits_go_to_the_profile(s: Setup) -> None:
    s.snapshot(
        "VIP",
        [("u1", "ann@example.com", "Ann Lee", "+33 1 23", "https://a.example/ann.png")],
        header="user_id,email,name,phone,avatar",
    )
    assert s.sync("VIP").exit_code == 0
    profile = s.server.profile_by_email("ann@example.com")
    assert profile is not None
    assert profile["person"] == {
        "nickname": "Ann Lee",
        "phone": "+33 1 23",
        "avatar": "https://a.example/ann.png",
    }
    # a changed name is sent once, with the next membership change
    s.server.reset_counts()
    s.snapshot("VIP", [], header="user_id,email,name,phone,avatar")
    s.sync("VIP")
    assert s.server.count() == 1  # the user left; no identity change to send
    s.snapshot(
        "VIP",
        [("u1", "ann@example.com", "Ann Lee-Smith", "+33 1 23", "https://a.example/ann.png")],
        header="user_id,email,name,phone,avatar",
    )
    s.server.reset_counts()
    s.sync("VIP")
    assert [r.method for r in s.server.requests] == ["PATCH", "PATCH"]
    assert profile["person"]["nickname"] == "Ann Lee-Smith"


# -- users with no email --------------------------------------------------------------------------


def test_no_email_is_skipped_without_a_request_then_synced_once_it_appears(s: Setup) -> None:
    s.snapshot("VIP", [("u1", "u1@example.com"), ("u2", "")])
    result = s.sync("VIP")
    assert counts(result)["vip"]["status"] == "partial"
    assert counts(result)["vip"]["skipped"] == 1
    assert result.audiences[0].error is not None and "1 users skipped" in result.audiences[0].error
    assert s.server.count() == 2  # u1 only
    [pending] = s.rows("sync_pending")
    assert (pending["user_id"], pending["status"], pending["reason"]) == (
        "u2",
        "skipped",
        EMAIL_REQUIRED,
    )

    s.server.reset_counts()
    assert counts(s.sync("VIP"))["vip"]["skipped"] == 1
    assert s.server.count() == 0  # retried every run, at no cost

    s.snapshot("VIP", [("u1", "u1@example.com"), ("u2", "u2@example.com")])
    result = s.sync("VIP")
    assert result.exit_code == 0 and counts(result)["vip"]["delivered"] == 1
    assert s.data("u2@example.com") == {"vip": True}
    assert s.rows("sync_pending") == []


# -- profiles that already exist in Crisp ---------------------------------------------------------


@pytest.mark.parametrize("email_as_people_id", [True, False])
def test_existing_profiles_are_resolved_by_email(s: Setup, email_as_people_id: bool) -> None:
    s.server.email_as_people_id = email_as_people_id
    for _, email in users(3):
        s.server.add_profile(email, person={"nickname": "from the widget"}, data={"seen": True})
    s.snapshot("VIP", users(4))
    result = s.sync("VIP")
    assert result.exit_code == 0
    assert len(s.server.profiles) == 4  # no duplicates
    for _, email in users(4):
        assert s.data(email)["vip"] is True
    assert s.data("u000@example.com") == {"seen": True, "vip": True}
    assert s.server.count("POST", "/people/profile") == 4  # 3 answered people_exists
    searches = s.server.count("GET", "search_text")
    # email accepted: 409 + update by email; refused: one wasted try, then a search each
    assert searches == (0 if email_as_people_id else 3)
    assert s.server.count("PATCH", "/people/data/") == 4 + (0 if email_as_people_id else 1)
    mapped = {r["user_id"]: r for r in s.rows("crisp_people")}
    assert len(mapped) == 4
    if not email_as_people_id:
        assert all(r["people_id"] for r in mapped.values())

    # steady state: one request per changed user, whichever way the profile was found
    s.server.reset_counts()
    s.snapshot("VIP", users(1))
    assert s.sync("VIP").exit_code == 0
    assert s.server.count() == 3 and s.server.count("PATCH", "/people/data/") == 3


def test_duplicate_email_conflict_as_400_is_resolved_too(s: Setup) -> None:
    s.server.conflict_status = 400
    s.server.add_profile("u000@example.com")
    s.snapshot("VIP", users(1))
    assert s.sync("VIP").exit_code == 0
    assert s.data("u000@example.com") == {"vip": True}


def test_profile_deleted_in_crisp_is_created_again_only_when_needed(s: Setup) -> None:
    s.snapshot("VIP", users(2))
    s.sync("VIP")
    gone = s.server.profile_by_email("u000@example.com")
    assert gone is not None
    s.server.profiles.pop(gone["people_id"])
    s.snapshot("VIP", [])
    s.server.reset_counts()
    assert s.sync("VIP").exit_code == 0
    # leaving: PATCH -> 404 people_not_found -> nothing to unset on a deleted profile
    assert s.server.profile_by_email("u000@example.com") is None
    assert s.data("u001@example.com") == {"vip": False}
    assert s.server.count() == 2
    # entering again: created anew (the people_id map forgot the deleted one)
    s.snapshot("VIP", users(1))
    assert s.sync("VIP").exit_code == 0
    assert s.data("u000@example.com") == {"vip": True}
    # a deleted profile that must receive `true` is re-created from the email in the map
    again = s.server.profile_by_email("u000@example.com")
    assert again is not None
    s.server.profiles.pop(again["people_id"])
    s.snapshot("Other", [("u000", "")])
    s.server.reset_counts()
    assert s.sync("Other").exit_code == 0
    assert s.data("u000@example.com") == {"other": True}
    assert [r.method for r in s.server.requests] == ["PATCH", "POST", "PATCH"]


# -- failures -------------------------------------------------------------------------------------


def test_invalid_input_is_held_until_it_changes(s: Setup) -> None:
    s.snapshot("VIP", [("u1", "u1@example.com"), ("u2", "not-an-email")])
    result = s.sync("VIP")
    assert counts(result)["vip"]["failed"] == 1
    [held] = s.rows("sync_pending")
    assert (held["user_id"], held["status"], held["status_code"], held["retryable"]) == (
        "u2",
        "failed",
        400,
        False,
    )
    assert "invalid_data" in held["reason"] and "POST /people/profile" in held["reason"]

    s.server.reset_counts()
    result = s.sync("VIP")
    assert s.server.count() == 0  # not retried every run forever
    assert "held after a permanent error" in (result.audiences[0].error or "")

    s.server.reset_counts()
    s.sync("VIP", retry_failed=True)  # an operator asks for it
    assert s.server.count("POST", "/people/profile") == 1

    s.snapshot("VIP", [("u1", "u1@example.com"), ("u2", "u2@example.com")])  # input changed
    assert s.sync("VIP").exit_code == 0
    assert s.data("u2@example.com") == {"vip": True}


def test_server_errors_are_retried_then_recorded_for_the_next_run(s: Setup) -> None:
    s.options = {"max_retries": 2}
    s.snapshot("VIP", users(3))
    s.server.error_rate = 1.0
    result = s.sync("VIP")
    assert counts(result)["vip"]["failed"] == 3 and counts(result)["vip"]["status"] == "partial"
    assert s.server.count() == 3 * 3  # each create tried 1 + max_retries times
    rows = s.rows("sync_pending")
    assert {r["retryable"] for r in rows} == {True}
    assert all("HTTP 503 server_error" in r["reason"] for r in rows)
    s.server.error_rate = 0.0
    assert s.sync("VIP").exit_code == 0
    assert s.rows("sync_pending") == []


def test_random_server_errors_and_dropped_connections_lose_nothing(s: Setup) -> None:
    s.options = {"max_retries": 8}
    s.server.error_rate = 0.3
    s.server.drop_connection_next = 3
    s.snapshot("VIP", users(30))
    assert s.sync("VIP").exit_code == 0
    assert len(s.server.profiles) == 30
    assert all(s.data(e) == {"vip": True} for _, e in users(30))


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, True), (429, False), (420, True), (420, False)]
)
def test_rate_limits_slow_down_but_never_give_up(s: Setup, status: int, retry_after: bool) -> None:
    s.server.rate_limit_per_second = 15
    s.server.rate_limit_status = status
    s.server.send_retry_after = retry_after
    s.options = {"requests_per_second": 100, "max_retries": 0}
    s.snapshot("VIP", users(12))
    result = s.sync("VIP")
    assert result.exit_code == 0, counts(result)
    limited = [r for r in s.server.requests if r.status == status]
    assert limited  # the limit was hit, and every user still made it
    assert all(s.data(e) == {"vip": True} for _, e in users(12))


# -- the daily quota -----------------------------------------------------------------------------


def test_request_budget_stops_the_run_and_the_next_run_carries_on(s: Setup) -> None:
    s.options = {"daily_request_budget": 15, "max_concurrency": 2}
    s.snapshot("VIP", users(20))
    result = s.sync("VIP")
    vip = counts(result)["vip"]
    assert vip["status"] == "partial" and result.exit_code == 5
    message = result.audiences[0].error or ""
    # The budget goes to users it can finish: 7 new users (create + data), none half-done;
    # the 15th request could not finish anyone, so it is not spent.
    assert message.startswith("quota: 14 of 15 requests used today (UTC)")
    assert "13 users deferred, not started" in message
    assert "users pending, about" in message and "more day" in message
    assert s.server.count() == 14 and vip["delivered"] == 7
    assert all(p["data"] == {"vip": True} for p in s.server.profiles.values())
    assert vip["failed"] == 0 and vip["pending"] == 20 - vip["delivered"]
    assert [r for r in s.rows("sync_pending") if r["status"] == "failed"] == []
    [run] = [r for r in s.rows("sync_runs")]
    assert run["status"] == "partial" and run["pending"] == vip["pending"]

    s.server.reset_counts()
    result = s.sync("VIP")  # same day: nothing left to spend, nothing sent
    assert counts(result)["vip"]["status"] == "partial" and s.server.count() == 0

    # the UTC day turns: the counter starts again and the next run finishes the job
    engine = sa.create_engine(s.state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE destination_requests SET day = '2000-01-01'"))
    engine.dispose()
    s.options["daily_request_budget"] = 100
    result = s.sync("VIP")
    assert result.exit_code == 0
    assert len(s.server.profiles) == 20
    assert all(s.data(e) == {"vip": True} for _, e in users(20))
    total = sum(r["used"] for r in s.rows("destination_requests"))
    assert total >= 40  # every request counted (unused reservations were given back)


def test_quota_refused_by_crisp_ends_partial_and_resumes_after_the_reset(s: Setup) -> None:
    s.server.daily_quota = 11
    s.options = {"max_concurrency": 1}
    s.snapshot("VIP", users(10))
    result = s.sync("VIP")
    assert counts(result)["vip"]["status"] == "partial"
    assert "over quota" in (result.audiences[0].error or "")
    assert counts(result)["vip"]["failed"] == 0
    s.server.reset_quota()
    assert s.sync("VIP").exit_code == 0
    assert all(s.data(e) == {"vip": True} for _, e in users(10))
    assert len(s.server.profiles) == 10


def test_rate_limiting_that_never_ends_is_taken_as_a_spent_quota(s: Setup) -> None:
    s.server.rate_limit_per_second = 0  # every request: 429
    s.options = {"rate_limit_patience": 1.0}
    s.snapshot("VIP", users(3))
    result = s.sync("VIP")
    assert counts(result)["vip"]["status"] == "partial"
    assert "kept answering 429" in (result.audiences[0].error or "")
    assert counts(result)["vip"]["failed"] == 0
    s.server.rate_limit_per_second = None
    assert s.sync("VIP").exit_code == 0


# -- credentials ----------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["key", "tier"])
def test_rejected_credentials_stop_the_run_with_state_untouched(
    s: Setup, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    if problem == "key":
        monkeypatch.setenv("CRISP_KEY", "wrong-key")
    else:
        s.options = {"tier": "website"}
    s.snapshot("VIP", users(20))
    result = s.sync("VIP")
    assert result.exit_code == CredentialsError.exit_code == 6
    [vip] = result.audiences
    assert vip.status is RunStatus.FAILED and vip.error_type is CredentialsError
    expected = "401 unauthorized" if problem == "key" else "403 not_allowed"
    assert expected in (vip.error or "")
    assert s.server.count() <= 8  # at most the first requests in flight
    assert s.rows("sync_members") == [] and s.rows("sync_pending") == []
    assert s.rows("crisp_people") == []
    assert "wrong-key" not in (vip.error or "")


def test_unknown_website_stops_the_run(s: Setup) -> None:
    s.options = {"website_id": "not-my-website"}
    s.snapshot("VIP", users(3))
    result = s.sync("VIP")
    assert result.exit_code == 6
    assert "Crisp does not know website 'not-my-website'" in (result.audiences[0].error or "")
    assert s.rows("sync_members") == [] and s.server.profiles == {}


def test_missing_credentials_fail_before_any_state_change(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRISP_KEY")
    s.snapshot("VIP", users(2))
    with pytest.raises(CredentialsError, match=r"set \$CRISP_KEY in the environment"):
        s.sync("VIP")
    assert s.rows("sync_runs") == [] and s.server.count() == 0


def test_credentials_never_appear_in_logs_state_or_reprs(
    s: Setup, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    s.snapshot("VIP", [*users(3), ("u9", "")])
    s.server.fail_next = [(503, "server_error"), (400, "invalid_data")]
    s.sync("VIP")
    monkeypatch.setenv("CRISP_KEY", "wrong")
    s.sync("VIP", full=True)
    config = load_config(s.config("VIP"))
    texts = [caplog.text, repr(config), str(config)]
    texts += [repr(row) for t in ("sync_runs", "sync_pending", "sync_changes") for row in s.rows(t)]
    for text in texts:
        assert CRISP_KEY not in text and CRISP_IDENTIFIER not in text


# -- batch ----------------------------------------------------------------------------------------


def test_batch_sends_identical_changes_together(s: Setup) -> None:
    # linger long enough that a loaded machine still fills the groups (10 + 10 + 5)
    s.options = {"batch": True, "batch_size": 10, "batch_linger": 1.0}
    s.snapshot("VIP", users(25))
    assert s.sync("VIP").exit_code == 0
    assert s.server.count("POST", "/people/profile") == 25
    assert s.server.count("PATCH", "/batch/data") == 3  # 10 + 10 + 5
    assert s.server.count("PATCH", "/people/data/") == 0
    assert all(s.data(e) == {"vip": True} for _, e in users(25))

    s.server.reset_counts()
    s.snapshot("VIP", users(5))  # 20 leave: the same change for all of them
    assert s.sync("VIP").exit_code == 0
    assert s.server.count() == 2  # 0.1 requests per changed user
    assert all(s.data(e) == {"vip": False} for _, e in users(20, start=5))


def test_batch_route_refused_falls_back_to_per_user_requests(s: Setup) -> None:
    s.options = {"batch": True, "batch_size": 10, "batch_linger": 0.2}
    s.snapshot("VIP", users(12))
    s.sync("VIP")
    s.server.batch_enabled = False
    s.server.reset_counts()
    s.snapshot("VIP", [])
    assert s.sync("VIP").exit_code == 0
    # refused for the batches already on the wire (10 + 2), then not tried again
    assert s.server.count("PATCH", "/batch/data") <= 2
    assert s.server.count("PATCH", "/people/data/") == 12
    assert all(s.data(e) == {"vip": False} for _, e in users(12))


def test_batch_too_large_is_split(s: Setup) -> None:
    s.options = {"batch": True, "batch_size": 16, "batch_linger": 0.2}
    s.server.batch_max = 5
    s.snapshot("VIP", users(16))
    assert s.sync("VIP").exit_code == 0
    assert all(s.data(e) == {"vip": True} for _, e in users(16))
    ok = [r for r in s.server.requests if "/batch/data" in r.path and r.status == 200]
    assert ok and all(len(r.body["people"]["profiles"]) <= 5 for r in ok)


def test_batch_with_a_deleted_profile_falls_back_for_that_batch(s: Setup) -> None:
    s.options = {"batch": True, "batch_size": 10, "batch_linger": 0.2}
    s.snapshot("VIP", users(4))
    s.sync("VIP")
    gone = s.server.profile_by_email("u002@example.com")
    assert gone is not None
    s.server.profiles.pop(gone["people_id"])
    s.snapshot("VIP", [])
    s.server.reset_counts()
    assert s.sync("VIP").exit_code == 0
    assert all(s.data(e) == {"vip": False} for _, e in users(4) if e != "u002@example.com")
    # the refused batch (all or nothing), then one data update per user
    assert s.server.count("PATCH", "/batch/data") == 1
    assert s.server.count("PATCH", "/people/data/") == 4


# -- events ---------------------------------------------------------------------------------------


def test_audience_events(s: Setup) -> None:
    s.options = {"audience_events": True}
    s.snapshot("VIP Users", users(2))
    s.sync("VIP Users")
    s.snapshot("VIP Users", users(1))
    s.sync("VIP Users")
    kept = s.server.profile_by_email("u000@example.com")
    left = s.server.profile_by_email("u001@example.com")
    assert kept is not None and left is not None
    assert [e["text"] for e in kept["events"]] == ["Audience Entered"]  # Engage's names
    assert [e["text"] for e in left["events"]] == ["Audience Entered", "Audience Exited"]
    assert left["events"][1]["data"] == {
        "audience_key": "vip_users",
        "audience_name": "VIP Users",
        "vip_users": False,
    }
    s.options |= {"entered_event": "Audience Entered: {audience}"}  # the 0.1 naming
    s.snapshot("VIP Users", users(3))
    s.sync("VIP Users")
    back = s.server.profile_by_email("u001@example.com")
    assert back is not None and back["events"][-1]["text"] == "Audience Entered: VIP Users"


def test_track_to_known_users_and_dropped_for_unknown(s: Setup) -> None:
    s.snapshot("VIP", users(1))
    s.sync("VIP")
    config = load_config(s.config("VIP"))
    s.server.reset_counts()
    result = track(
        config,
        [
            TrackEvent(user_id="u000", event="Completed Purchase", properties={"revenue": 42.99}),
            TrackEvent(user_id="nobody", event="Completed Purchase"),
            IdentifyCall(user_id="u100", traits={"email": "new@example.com", "plan": "pro"}),
            TrackEvent(user_id="u100", event="Signed Up", properties={"via": "ads"}),
        ],
    )
    assert [o.status.value for o in result.outcomes] == [
        "delivered",
        "skipped",
        "delivered",
        "delivered",
    ]
    assert result.outcomes[1].reason == TRACK_DROPPED
    assert result.exit_code == 5 and result.counts["skipped"] == 1
    profile = s.server.profile_by_email("u000@example.com")
    assert profile is not None
    assert [(e["text"], e["data"]) for e in profile["events"]] == [
        ("Completed Purchase", {"revenue": 42.99})
    ]
    new = s.server.profile_by_email("new@example.com")
    assert new is not None and new["data"] == {"plan": "pro"}
    assert [e["text"] for e in new["events"]] == ["Signed Up"]
    assert s.server.count() == 1 + 2 + 1  # the dropped call cost nothing


def test_dry_run_estimates_requests_and_days_of_quota(s: Setup) -> None:
    s.options = {"daily_request_budget": 10}
    s.snapshot("VIP", [*users(6), ("u9", "")])
    result = s.sync("VIP", dry_run=True)
    assert result.cost == {
        "users": 7,
        "known": 0,
        "new": 6,
        "no_email": 1,
        "requests": 12,
        "daily_request_budget": 10,
        "used_today": 0,
        "days": 2,
    }
    assert s.server.count() == 0 and s.rows("sync_runs") == []
    s.options = {"daily_request_budget": 100}
    s.sync("VIP")
    s.snapshot("VIP", users(3))
    cost = s.sync("VIP", dry_run=True).cost
    assert (cost["known"], cost["requests"], cost["used_today"], cost["days"]) == (3, 3, 12, 1)


def test_quota_pays_for_the_batch_its_created_users_wait_for(s: Setup) -> None:
    s.options = {
        "batch": True,
        "batch_size": 50,
        "batch_linger": 30,
        "daily_request_budget": 12,
        "max_concurrency": 2,
    }
    s.snapshot("VIP", users(20))
    result = s.sync("VIP")
    # 11 creates and the batch that finishes them (before: 12 creates, no batch, 0 finished)
    vip = counts(result)["vip"]
    assert (vip["status"], vip["delivered"], vip["failed"], vip["pending"]) == ("partial", 11, 0, 9)
    assert s.server.count("POST", "/people/profile") == 11
    assert s.server.count("PATCH", "/batch/data") == 1 and s.server.count() == 12
    assert "9 users deferred" in (result.audiences[0].error or "")
    engine = sa.create_engine(s.state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE destination_requests SET day = '2000-01-01'"))
    engine.dispose()
    # The batch waits for the 9 creates: at 0.2 s of linger a loaded machine split it in two.
    s.options |= {"daily_request_budget": 100, "batch_linger": 5}
    s.server.reset_counts()
    assert s.sync("VIP").exit_code == 0
    assert s.server.count("POST", "/people/profile") == 9
    assert s.server.count("PATCH", "/batch/data") == 1
    assert all(s.data(e) == {"vip": True} for _, e in users(20))
