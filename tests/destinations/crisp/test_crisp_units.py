"""Unit tests of the Crisp destination's pure parts and its client, without a network.

The client is driven through ``httpx.MockTransport``: a function stands in for Crisp.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import CRISP_IDENTIFIER, CRISP_KEY, REPO, crisp_env
from pydantic import ValidationError

from audience_sync.config import load_config
from audience_sync.destinations.budget import RequestBudget, destination_requests
from audience_sync.destinations.crisp import (
    CrispCredentials,
    CrispSettings,
    Secret,
    Verdict,
    classify,
)
from audience_sync.destinations.crisp.client import CrispClient, retry_after_seconds, segment
from audience_sync.destinations.crisp.payloads import (
    audience_event,
    batch_body,
    card_hash,
    data_body,
    identify_parts,
    profile_card,
)
from audience_sync.destinations.crisp.ratelimit import AdaptiveRateLimiter
from audience_sync.errors import ConfigError, CredentialsError, QuotaExhausted
from audience_sync.model import Change, Identity
from audience_sync.state import connect, upgrade

# -- classify: one table of what each answer means ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "verdict"),
    [
        (200, "updated", Verdict.OK),
        (201, "added", Verdict.OK),
        (204, None, Verdict.OK),
        (0, "timeout", Verdict.TRANSIENT),
        (429, "rate_limited", Verdict.RATE_LIMITED),
        (420, "rate_limited", Verdict.RATE_LIMITED),
        (429, None, Verdict.RATE_LIMITED),
        (429, "quota_exceeded", Verdict.QUOTA),
        (402, "quota_limit_exceeded", Verdict.QUOTA),
        (401, "unauthorized", Verdict.CREDENTIALS),
        (401, "invalid_session", Verdict.CREDENTIALS),
        (403, "invalid_session", Verdict.CREDENTIALS),
        (403, "not_allowed", Verdict.REFUSED),
        (402, "not_allowed", Verdict.REFUSED),
        (404, "not_found", Verdict.REFUSED),
        (405, None, Verdict.REFUSED),
        (404, "website_not_found", Verdict.WEBSITE),
        (404, "people_not_found", Verdict.NOT_FOUND),
        (409, "people_exists", Verdict.CONFLICT),
        (400, "people_exists", Verdict.CONFLICT),
        (409, None, Verdict.CONFLICT),
        (400, "invalid_data", Verdict.PERMANENT),
        (413, None, Verdict.PERMANENT),
        (408, None, Verdict.TRANSIENT),
        (422, "invalid_session", Verdict.CREDENTIALS),
        (422, "unprocessable", Verdict.TRANSIENT),
        (500, "server_error", Verdict.TRANSIENT),
        (502, None, Verdict.TRANSIENT),
        (503, "server_error", Verdict.TRANSIENT),
    ],
)
def test_classify(status: int, reason: str | None, verdict: Verdict) -> None:
    assert classify(status, reason) is verdict


# -- payloads -------------------------------------------------------------------------------------


def test_profile_card_maps_identity_traits() -> None:
    identity = Identity(email="ann@x.com", name="Ann", phone="+33 1", avatar="https://a/p.png")
    assert profile_card(identity) == {
        "email": "ann@x.com",
        "person": {"nickname": "Ann", "phone": "+33 1", "avatar": "https://a/p.png"},
    }
    assert profile_card(Identity(email="b@x.com")) == {"email": "b@x.com"}
    assert profile_card(Identity()) == {}
    assert card_hash({"a": 1, "b": 2}) == card_hash({"b": 2, "a": 1})


def test_data_is_always_wrapped() -> None:
    assert data_body({"vip": True, "churn_risk": False}) == {
        "data": {"vip": True, "churn_risk": False}
    }
    assert batch_body(["p1", "p2"], {"vip": True}) == {
        "people": {"profiles": ["p1", "p2"]},
        "data": {"vip": True},
    }


def test_audience_event_body() -> None:
    """Engage's event names by default, its properties plus the audience's name as data."""
    entered = audience_event(Change("vip_users", "VIP Users", True, "m1"))
    assert entered == {
        "text": "Audience Entered",
        "data": {"audience_key": "vip_users", "audience_name": "VIP Users", "vip_users": True},
        "color": "green",
    }
    exited = audience_event(Change("vip_users", "VIP Users", False, "m2"))
    assert (exited["text"], exited["data"]["vip_users"]) == ("Audience Exited", False)
    # The 0.1 naming, kept as an option: the audience in the event's name.
    legacy = ("Audience Entered: {audience}", "Audience Exited: {audience} ({key})")
    assert audience_event(Change("vip_users", "VIP Users", False, "m3"), *legacy)["text"] == (
        "Audience Exited: VIP Users (vip_users)"
    )


@pytest.mark.parametrize("name", ["", "Entered {audiance}", "Entered {", "{0}"])
def test_event_names_take_only_the_audience_and_its_key(name: str) -> None:
    with pytest.raises(ValidationError, match="event name"):
        CrispSettings.model_validate({"website_id": "w", "entered_event": name})


def test_identify_parts_splits_identity_and_data() -> None:
    identity, data, left_out = identify_parts(
        {
            "email": " ann@x.com ",
            "firstName": "Ann",
            "lastName": "Lee",
            "plan": "pro",
            "seats": 3,
            "mrr": 49.5,
            "trialEnded": True,
            "address": {"city": "Paris"},
            "tags": ["a"],
            "nothing": None,
        }
    )
    assert identity == Identity(email="ann@x.com", name="Ann Lee")
    assert data == {"plan": "pro", "seats": 3, "mrr": 49.5, "trial_ended": True}
    assert sorted(left_out) == ["address", "nothing", "tags"]


def test_segment_escapes_emails_for_paths() -> None:
    assert segment("a+b@x.com") == "a%2Bb@x.com"
    assert segment("a/b@x.com") == "a%2Fb@x.com"
    assert segment("8c842203-7ed8-4e29-a608-7cf78a7d2fcc") == "8c842203-7ed8-4e29-a608-7cf78a7d2fcc"


def test_retry_after_seconds() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds("Wed, 25 Nov 2026 12:00:07 GMT", now=now) == 7.0


# -- settings and secrets -------------------------------------------------------------------------


def _config(tmp_path: Path, destination: str, env: dict[str, str] | None = None) -> Any:
    (tmp_path / "a.csv").write_text("user_id\n1\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[destination]\n{destination}\n[[audiences]]\nname = "A"\nsource = "a.csv"\n')
    return load_config(path, env=env or {})


def test_settings_defaults_and_env_override(tmp_path: Path) -> None:
    config = _config(tmp_path, 'type = "crisp"\nwebsite_id = "from-file"')
    settings = config.destination.settings
    assert isinstance(settings, CrispSettings)
    assert (settings.tier, settings.max_concurrency, settings.daily_request_budget) == (
        "plugin",
        8,
        5000,
    )
    assert (settings.requests_per_second, settings.batch, settings.api_url) == (
        10,
        False,
        "https://api.crisp.chat/v1",
    )
    assert config.destination.name == "crisp:from-file"
    config = _config(tmp_path, 'type = "crisp"', env={"CRISP_WEBSITE_ID": "from-env"})
    assert config.destination.settings.website_id == "from-env"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "crisp"', "destination.website_id: missing; set `website_id` in [destination]"),
        ('type = "crisp"\nwebsite_id = "w"\ntier = "admin"', "destination.tier"),
        ('type = "crisp"\nwebsite_id = "w"\nmax_concurrency = 0', "destination.max_concurrency"),
        ('type = "crisp"\nwebsite_id = "w"\napi_url = "ftp://x"', "not an http(s) URL"),
        ('type = "crisp"\nwebsite_id = "w"\nbatchsize = 3', "destination.batchsize: unknown key"),
        (
            'type = "crisp"\nwebsite_id = "w"\nkey = "hunter2-secret"',
            "credentials are read only from the environment ($CRISP_IDENTIFIER and $CRISP_KEY)",
        ),
    ],
)
def test_settings_errors_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, table)
    assert message in str(info.value)
    assert str(tmp_path / "c.toml") in str(info.value)
    assert "hunter2-secret" not in str(info.value)


def test_credentials_never_print() -> None:
    creds = CrispCredentials.from_env(crisp_env())
    for text in (repr(creds), str(creds), repr(creds.key), f"{creds.identifier}"):
        assert CRISP_KEY not in text and CRISP_IDENTIFIER not in text
    assert creds.key.reveal() == CRISP_KEY
    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "$CRISP_IDENTIFIER and $CRISP_KEY"),
        ({"CRISP_IDENTIFIER": "i"}, "$CRISP_KEY"),
        ({"CRISP_IDENTIFIER": "i", "CRISP_KEY": "  "}, "$CRISP_KEY"),
    ],
)
def test_missing_credentials_say_where_to_look(env: dict[str, str], missing: str) -> None:
    with pytest.raises(CredentialsError, match="Crisp credentials missing") as info:
        CrispCredentials.from_env(env)
    assert f"set {missing} in the environment" in str(info.value)


# -- the adaptive limiter, on a fake clock --------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_limiter_paces_evenly_without_bursts() -> None:
    t = FakeTime()
    limiter = AdaptiveRateLimiter(10, clock=t.clock, sleep=t.sleep)

    async def go() -> None:
        for _ in range(5):
            await limiter.acquire()

    asyncio.run(go())
    assert t.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_limiter_pauses_on_rate_limit_and_recovers() -> None:
    t = FakeTime()
    limiter = AdaptiveRateLimiter(10, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0)
    assert limiter.on_rate_limited(retry_after=3) == pytest.approx(3)
    assert limiter.rate == pytest.approx(8)
    # answers of requests already in flight do not escalate the pause or the slowdown
    limiter.on_rate_limited(retry_after=None)
    assert limiter.rate == pytest.approx(8)
    asyncio.run(limiter.acquire())
    assert t.sleeps == pytest.approx([3])
    t.now += 1
    assert limiter.limited_for == pytest.approx(4)
    # no Retry-After: exponential backoff (0.1 s, 0.2 s, 0.4 s ... with jitter; rng=1 -> full),
    # doubling with each pause that ends in another rate-limit answer (this is the 2nd)
    assert limiter.on_rate_limited(None) == pytest.approx(0.2)
    t.now += 5
    assert limiter.on_rate_limited(None) == pytest.approx(0.4)
    t.now += 5
    assert limiter.on_rate_limited(None) == pytest.approx(0.8)
    assert limiter.rate == pytest.approx(10 * 0.8**4)
    # success: fast back to just under the rate that was limited, slowly beyond it
    limiter.on_success()
    assert limiter.limited_for == 0
    for _ in range(40):
        limiter.on_success()
    mark = 10 * 0.8**3 * 0.95
    assert mark <= limiter.rate < mark + 0.3  # one fast step past the mark at most
    for _ in range(20_000):
        limiter.on_success()
    assert limiter.rate == 10


# -- the request budget (state database, both backends) -----------------------------------------


def test_budget_counts_per_day_and_stops_before_the_limit(state_url: str) -> None:
    engine = connect(state_url)
    upgrade(engine)
    day = [datetime(2026, 11, 25, 23, 59, tzinfo=UTC)]
    budget = RequestBudget(engine, "crisp:w", 25, clock=lambda: day[0], block=10)
    other = RequestBudget(engine, "crisp:w", 25, clock=lambda: day[0], block=10)

    async def spend(b: RequestBudget, n: int) -> None:
        for _ in range(n):
            await b.spend()

    asyncio.run(spend(budget, 12))  # reserved 2 blocks of 10: 20 counted
    asyncio.run(spend(other, 3))  # a second process shares the day's count: takes the last 5
    with pytest.raises(QuotaExhausted, match="quota: 25 of 25 requests used today"):
        asyncio.run(spend(budget, 11))
    assert budget.spent == 20  # refused before passing the limit, never after
    asyncio.run(other.release())  # gives back its 2 unused reservations
    assert budget.used_today() == 23
    asyncio.run(spend(budget, 2))
    with pytest.raises(QuotaExhausted):
        asyncio.run(spend(budget, 1))
    with engine.connect() as conn:
        assert conn.execute(sa.select(destination_requests.c.used)).scalar_one() == 25
    day[0] = datetime(2026, 11, 26, 0, 1, tzinfo=UTC)  # UTC midnight: a new budget
    asyncio.run(spend(budget, 5))
    with engine.connect() as conn:
        rows = dict(
            conn.execute(sa.select(destination_requests.c.day, destination_requests.c.used)).all()
        )
    assert rows[date(2026, 11, 26)] == 10  # one block reserved
    asyncio.run(budget.release())
    assert budget.used_today() == 5
    engine.dispose()


# -- the client, through httpx.MockTransport ------------------------------------------------------


def _client(
    handler: Callable[[httpx.Request], httpx.Response], tmp_path: Path, **kwargs: Any
) -> tuple[CrispClient, FakeTime]:
    engine = connect(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(engine)
    t = FakeTime()
    http = httpx.AsyncClient(
        base_url="https://api.crisp.test/v1/website/w", transport=httpx.MockTransport(handler)
    )
    options: dict[str, Any] = {"max_retries": 3, "patience": 60.0} | kwargs
    client = CrispClient(
        http,
        AdaptiveRateLimiter(1000, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0),
        RequestBudget(engine, "crisp:w", 1000),
        website_id="w",
        tier="plugin",
        sleep=t.sleep,
        rng=lambda: 1.0,
        **options,
    )
    return client, t


def _answer(
    status: int, reason: str = "ok", headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(
        status, json={"error": status >= 400, "reason": reason, "data": {}}, headers=headers
    )


def test_client_retries_transient_with_backoff_then_gives_up(tmp_path: Path) -> None:
    answers = [_answer(503, "server_error")] * 10
    client, t = _client(lambda r: answers.pop(0), tmp_path)
    reply = asyncio.run(client.call("PATCH", "/people/data/x", route="PATCH /people/data", json={}))
    assert reply.verdict is Verdict.TRANSIENT and reply.status == 503
    assert client.sent == 4  # one try + max_retries
    assert t.sleeps == pytest.approx([0.5, 1.0, 2.0])
    assert reply.describe() == "HTTP 503 server_error from PATCH /people/data"


def test_client_honours_retry_after_on_429_and_never_gives_up(tmp_path: Path) -> None:
    answers = [_answer(429, "rate_limited", {"Retry-After": "2"})] * 6 + [_answer(200)]
    client, t = _client(lambda r: answers.pop(0), tmp_path, max_retries=1)
    reply = asyncio.run(client.call("PATCH", "/people/data/x", route="PATCH /people/data"))
    assert reply.ok and client.sent == 7  # rate limits do not use up max_retries
    assert sum(t.sleeps) >= 2 * 6


def test_client_transport_errors_are_transient(tmp_path: Path) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return _answer(200)

    client, _ = _client(handler, tmp_path)
    assert asyncio.run(client.call("GET", "/people/profiles/1", route="GET")).ok
    assert len(calls) == 3


def test_client_stops_on_401_and_quota(tmp_path: Path) -> None:
    client, _ = _client(lambda r: _answer(401, "unauthorized"), tmp_path)
    with pytest.raises(CredentialsError) as info:
        asyncio.run(client.call("GET", "/x", route="GET /x"))
    assert "HTTP 401 unauthorized" in str(info.value) and CRISP_KEY not in str(info.value)
    client, _ = _client(lambda r: _answer(429, "quota_exceeded"), tmp_path)
    with pytest.raises(QuotaExhausted, match="over quota"):
        asyncio.run(client.call("GET", "/x", route="GET /x"))


def test_client_persistent_rate_limit_means_quota(tmp_path: Path) -> None:
    client, _ = _client(lambda r: _answer(420, "rate_limited"), tmp_path, patience=30.0)
    with pytest.raises(QuotaExhausted, match="kept answering 420"):
        asyncio.run(client.call("GET", "/x", route="GET /x"))
    assert client.sent > 3


def test_client_sends_basic_auth_tier_and_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _answer(200)

    async def go() -> None:
        async with httpx.AsyncClient(
            base_url="https://api.crisp.test/v1/website/w",
            auth=httpx.BasicAuth("id", "key"),
            headers={"X-Crisp-Tier": "website"},
            transport=httpx.MockTransport(handler),
        ) as http:
            await http.patch("/people/data/p", json={"data": {"a": True}})

    asyncio.run(go())
    request = seen[0]
    assert request.headers["authorization"] == "Basic aWQ6a2V5"
    assert request.headers["x-crisp-tier"] == "website"
    assert request.headers["content-type"] == "application/json"


def test_bundled_crisp_example_config_is_valid() -> None:
    example = REPO / "config" / "crisp-example.toml"
    config = load_config(example, env={"CRISP_WEBSITE_ID": "w-from-env"})
    assert config.destination.type == "crisp"
    assert config.destination.name == "crisp:w-from-env"
    assert [a.trait_key for a in config.audiences] == [
        "order_completed_last_30days",
        "high_value_customers",
    ]
