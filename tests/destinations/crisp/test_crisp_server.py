"""Tests of the loopback Crisp test server itself, over real sockets with httpx."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from crisp_server import CrispServer

WEBSITE = "w1"
IDENTIFIER = "id1"
KEY = "k1"


@pytest.fixture
def srv() -> Iterator[CrispServer]:
    with CrispServer(website_id=WEBSITE, identifier=IDENTIFIER, key=KEY, tier="plugin") as server:
        yield server
    assert server.errors == []


def make_client(srv: CrispServer, **kwargs: Any) -> httpx.Client:
    options: dict[str, Any] = {
        "base_url": f"{srv.url}/website/{WEBSITE}",
        "auth": (IDENTIFIER, KEY),
        "headers": {"X-Crisp-Tier": "plugin"},
        "timeout": 5.0,
    }
    options.update(kwargs)
    return httpx.Client(**options)


@pytest.fixture
def client(srv: CrispServer) -> Iterator[httpx.Client]:
    with make_client(srv) as c:
        yield c


def create(client: httpx.Client, email: str, **person: str) -> str:
    r = client.post("/people/profile", json={"email": email, "person": person})
    assert r.status_code == 201, r.text
    people_id: str = r.json()["data"]["people_id"]
    return people_id


# -- lifecycle, binding, auth ---------------------------------------------------------------------


def test_url_is_loopback_and_stop_closes_the_port() -> None:
    server = CrispServer(website_id=WEBSITE, identifier=IDENTIFIER, key=KEY).start()
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        assert server.port > 0
        with make_client(server) as c:
            assert c.get("/people/profiles/1").status_code == 200
    finally:
        server.stop()
    with make_client(server) as c, pytest.raises(httpx.ConnectError):
        c.get("/people/profiles/1")


@pytest.mark.parametrize(
    ("auth", "tier", "status", "reason"),
    [
        (None, "plugin", 401, "unauthorized"),
        ((IDENTIFIER, "wrong"), "plugin", 401, "unauthorized"),
        (("other", KEY), "plugin", 401, "unauthorized"),
        ((IDENTIFIER, KEY), "website", 403, "not_allowed"),
        ((IDENTIFIER, KEY), None, 403, "not_allowed"),
    ],
)
def test_auth_and_tier_errors(
    srv: CrispServer, auth: tuple[str, str] | None, tier: str | None, status: int, reason: str
) -> None:
    headers = {"X-Crisp-Tier": tier} if tier else {}
    with httpx.Client(base_url=f"{srv.url}/website/{WEBSITE}", auth=auth, headers=headers) as c:
        r = c.get("/people/profiles/1")
    assert r.status_code == status
    assert r.json() == {"error": True, "reason": reason, "data": {}}


def test_website_tier_is_configurable() -> None:
    with (
        CrispServer(website_id=WEBSITE, identifier=IDENTIFIER, key=KEY, tier="website") as server,
        make_client(server, headers={"X-Crisp-Tier": "website"}) as c,
    ):
        assert c.get("/people/profiles/1").status_code == 200
        assert c.get("/people/profiles/1", headers={"X-Crisp-Tier": "plugin"}).status_code == 403


def test_unknown_website_and_route(srv: CrispServer, client: httpx.Client) -> None:
    r = client.get(f"{srv.url}/website/other/people/profiles/1")
    assert r.status_code == 404
    assert r.json() == {"error": True, "reason": "website_not_found", "data": {}}
    r = client.get("/people/nothing")
    assert (r.status_code, r.json()["reason"]) == (404, "not_found")


def test_body_requires_json_content_type(client: httpx.Client) -> None:
    r = client.post(
        "/people/profile", content=b'{"email": "a@x.com"}', headers={"Content-Type": "text/plain"}
    )
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")
    r = client.post(
        "/people/profile", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")


# -- people routes --------------------------------------------------------------------------------


def test_create_patch_data_and_events(srv: CrispServer, client: httpx.Client) -> None:
    r = client.post(
        "/people/profile",
        json={"email": "ann@example.com", "person": {"nickname": "Ann", "phone": "+331"}},
    )
    assert r.status_code == 201
    body = r.json()
    assert body["error"] is False and body["reason"] == "added"
    people_id = body["data"]["people_id"]
    assert len(people_id) == 36

    assert client.head(f"/people/profile/{people_id}").status_code == 200
    r = client.get(f"/people/profile/{people_id}")
    assert r.json()["data"]["person"] == {"nickname": "Ann", "phone": "+331"}

    r = client.patch(f"/people/profile/{people_id}", json={"person": {"avatar": "https://a/b.png"}})
    assert r.status_code == 200
    assert srv.profiles[people_id]["person"] == {
        "nickname": "Ann",
        "phone": "+331",
        "avatar": "https://a/b.png",
    }

    r = client.patch(f"/people/data/{people_id}", json={"data": {"vip": True, "plan": "pro"}})
    assert r.status_code == 200 and r.json()["error"] is False
    client.patch(f"/people/data/{people_id}", json={"data": {"score-1": 2.5}})
    r = client.get(f"/people/data/{people_id}")
    assert r.json()["data"] == {"data": {"vip": True, "plan": "pro", "score-1": 2.5}}

    r = client.post(
        f"/people/events/{people_id}",
        json={"text": "Order Completed", "data": {"total": 10}, "color": "green"},
    )
    assert r.status_code in (200, 201)
    events = srv.profiles[people_id]["events"]
    assert [(e["text"], e["data"], e["color"]) for e in events] == [
        ("Order Completed", {"total": 10}, "green")
    ]
    assert srv.profile_by_email("ANN@example.com") is srv.profiles[people_id]


def test_put_data_replaces_and_is_counted(srv: CrispServer, client: httpx.Client) -> None:
    people_id = srv.add_profile("bob@example.com", data={"other_tool": "x"})
    client.patch(f"/people/data/{people_id}", json={"data": {"a": True}})
    assert client.put(f"/people/data/{people_id}", json={"data": {"b": 1}}).status_code == 200
    assert srv.profiles[people_id]["data"] == {"b": 1}
    assert srv.count("PUT") == 1
    assert srv.count("PATCH", "/people/data/") == 1


@pytest.mark.parametrize(
    "payload",
    [
        {"vip": True},  # not wrapped in {"data": ...}
        {"data": {"VIP": True}},
        {"data": {"has space": True}},
        {"data": {"vip": None}},
        {"data": {"vip": [1]}},
        {"data": {"vip": {"nested": 1}}},
        {"data": [["vip", True]]},
    ],
)
def test_invalid_data(srv: CrispServer, client: httpx.Client, payload: Any) -> None:
    people_id = srv.add_profile("c@example.com")
    r = client.patch(f"/people/data/{people_id}", json=payload)
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")
    assert srv.profiles[people_id]["data"] == {}


@pytest.mark.parametrize("payload", [{}, {"email": "no-at-sign"}, {"email": 5}, {"person": {}}])
def test_create_requires_valid_email(client: httpx.Client, payload: dict[str, Any]) -> None:
    r = client.post("/people/profile", json=payload)
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")


def test_conflict_status_is_switchable(srv: CrispServer, client: httpx.Client) -> None:
    srv.add_profile("dup@example.com")  # e.g. created by the chat widget
    r = client.post("/people/profile", json={"email": "dup@example.com"})
    assert r.status_code == 409
    assert r.json() == {"error": True, "reason": "people_exists", "data": {}}
    srv.conflict_status = 400
    r = client.post("/people/profile", json={"email": "Dup@Example.com"})
    assert (r.status_code, r.json()["reason"]) == (400, "people_exists")
    assert len(srv.profiles) == 1
    with pytest.raises(ValueError):
        srv.add_profile("dup@example.com")


def test_email_as_people_id_on_and_off(srv: CrispServer, client: httpx.Client) -> None:
    people_id = srv.add_profile("eve@example.com")
    assert client.head("/people/profile/eve@example.com").status_code == 200
    r = client.patch("/people/data/eve@example.com", json={"data": {"in_audience": True}})
    assert r.status_code == 200
    assert srv.profiles[people_id]["data"] == {"in_audience": True}
    r = client.post("/people/events/eve%40example.com", json={"text": "Signed Up"})
    assert r.status_code in (200, 201)
    r = client.patch("/people/data/nobody@example.com", json={"data": {"x": True}})
    assert (r.status_code, r.json()["reason"]) == (404, "people_not_found")
    assert client.head("/people/profile/nobody@example.com").status_code == 404

    srv.email_as_people_id = False
    r = client.patch("/people/data/eve@example.com", json={"data": {"in_audience": False}})
    assert (r.status_code, r.json()["reason"]) == (404, "people_not_found")
    assert client.get(f"/people/data/{people_id}").json()["data"]["data"]["in_audience"] is True
    assert srv.count(path_contains="eve@example.com") == 4


def test_profile_email_change_put_and_delete(srv: CrispServer, client: httpx.Client) -> None:
    first = srv.add_profile("one@example.com", person={"nickname": "One"})
    srv.add_profile("two@example.com")
    r = client.patch(f"/people/profile/{first}", json={"email": "two@example.com"})
    assert (r.status_code, r.json()["reason"]) == (409, "people_exists")
    r = client.patch(f"/people/profile/{first}", json={"email": "uno@example.com"})
    assert r.status_code == 200
    assert srv.profile_by_email("one@example.com") is None
    assert client.head("/people/profile/uno@example.com").status_code == 200
    r = client.put(f"/people/profile/{first}", json={"email": "uno@example.com", "person": {}})
    assert r.status_code == 200 and srv.profiles[first]["person"] == {}
    assert client.delete("/people/profile/uno@example.com").status_code == 200
    assert first not in srv.profiles
    assert client.post("/people/profile", json={"email": "uno@example.com"}).status_code == 201


def test_unknown_people_id(client: httpx.Client) -> None:
    r = client.get("/people/data/8c842203-7ed8-4e29-a608-7cf78a7d2fcc")
    assert r.json() == {"error": True, "reason": "people_not_found", "data": {}}
    assert r.status_code == 404


def test_search_profiles_by_email_and_pages(srv: CrispServer, client: httpx.Client) -> None:
    ids = [srv.add_profile(f"u{i}@example.com", person={"nickname": f"U{i}"}) for i in range(25)]
    r = client.get("/people/profiles/1", params={"search_text": "u7@example.com"})
    assert r.status_code == 200
    assert r.json()["data"] == [
        {"people_id": ids[7], "email": "u7@example.com", "person": {"nickname": "U7"}}
    ]
    r = client.get("/people/profiles/1", params={"search_text": "missing@example.com"})
    assert (r.status_code, r.json()["data"]) == (200, [])
    assert len(client.get("/people/profiles/1").json()["data"]) == 20
    assert len(client.get("/people/profiles/2").json()["data"]) == 5


# -- batch ----------------------------------------------------------------------------------------


def test_batch_data(srv: CrispServer, client: httpx.Client) -> None:
    ids = [srv.add_profile(f"b{i}@example.com", data={"keep": i}) for i in range(3)]
    r = client.patch("/batch/data", json={"people": {"profiles": ids}, "data": {"vip": True}})
    assert r.status_code == 200 and r.json()["error"] is False
    assert [srv.profiles[i]["data"] for i in ids] == [{"keep": i, "vip": True} for i in range(3)]

    unknown = "00000000-0000-4000-8000-000000000000"
    r = client.patch(
        "/batch/data", json={"people": {"profiles": [ids[0], unknown]}, "data": {"vip": False}}
    )
    assert (r.status_code, r.json()["reason"]) == (404, "people_not_found")
    assert srv.profiles[ids[0]]["data"]["vip"] is True  # nothing applied
    r = client.patch(
        "/batch/data", json={"people": {"profiles": ["b0@example.com"]}, "data": {"vip": False}}
    )
    assert (r.status_code, r.json()["reason"]) == (404, "people_not_found")
    r = client.patch("/batch/data", json={"people": {"profiles": ids}, "data": {"Bad": True}})
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")


def test_batch_max_and_disabled(srv: CrispServer, client: httpx.Client) -> None:
    ids = [srv.add_profile(f"m{i}@example.com") for i in range(4)]
    srv.batch_max = 3
    r = client.patch("/batch/data", json={"people": {"profiles": ids}, "data": {"a": True}})
    assert (r.status_code, r.json()["reason"]) == (400, "invalid_data")
    r = client.patch("/batch/data", json={"people": {"profiles": ids[:3]}, "data": {"a": True}})
    assert r.status_code == 200

    srv.batch_enabled = False
    r = client.patch("/batch/data", json={"people": {"profiles": ids[:1]}, "data": {"a": False}})
    assert r.status_code == 404
    assert r.json() == {"error": True, "reason": "not_found", "data": {}}
    assert srv.profiles[ids[0]]["data"] == {"a": True}


# -- fault injection ------------------------------------------------------------------------------


@pytest.mark.parametrize(("send_retry_after", "status"), [(False, 429), (True, 429), (True, 420)])
def test_rate_limit(
    srv: CrispServer, client: httpx.Client, send_retry_after: bool, status: int
) -> None:
    srv.rate_limit_per_second = 3
    srv.rate_limit_status = status
    srv.send_retry_after = send_retry_after
    responses = [client.get("/people/profiles/1") for _ in range(6)]
    codes = [r.status_code for r in responses]
    assert codes[:3] == [200, 200, 200]
    limited = [r for r in responses if r.status_code == status]
    assert limited, codes
    for r in limited:
        assert r.json() == {"error": True, "reason": "rate_limited", "data": {}}
        if send_retry_after:
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert "Retry-After" not in r.headers
    srv.rate_limit_per_second = None
    assert client.get("/people/profiles/1").status_code == 200


def test_rate_limit_window_slides(srv: CrispServer, client: httpx.Client) -> None:
    srv.rate_limit_per_second = 2
    srv.send_retry_after = True
    srv.retry_after_seconds = 7
    assert [client.get("/people/profiles/1").status_code for _ in range(3)] == [200, 200, 429]
    assert srv.requests[-1].status == 429
    time.sleep(1.05)
    assert client.get("/people/profiles/1").status_code == 200
    r = [client.get("/people/profiles/1") for _ in range(2)][-1]
    assert r.headers.get("Retry-After") == "7"


def test_daily_quota_and_reset(srv: CrispServer, client: httpx.Client) -> None:
    srv.daily_quota = 3
    with httpx.Client(base_url=client.base_url) as anonymous:
        assert anonymous.get("/people/profiles/1").status_code == 401  # not counted
    codes = [client.get("/people/profiles/1").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = client.post("/people/profile", json={"email": "q@example.com"})
    assert r.status_code == 429
    assert r.json() == {"error": True, "reason": "quota_exceeded", "data": {}}
    assert srv.profiles == {}
    srv.reset_quota()
    assert srv.quota_used == 0
    assert client.get("/people/profiles/1").status_code == 200
    assert srv.quota_used == 1


def test_error_rate_is_seeded() -> None:
    def statuses(seed: int) -> list[int]:
        with (
            CrispServer(website_id=WEBSITE, identifier=IDENTIFIER, key=KEY, seed=seed) as server,
            make_client(server) as c,
        ):
            server.error_rate = 0.5
            codes = [c.get("/people/profiles/1").status_code for _ in range(40)]
            r = c.get("/people/profiles/1")
            if r.status_code == 503:
                assert r.json() == {"error": True, "reason": "server_error", "data": {}}
            return codes

    first = statuses(seed=42)
    assert first == statuses(seed=42)
    assert first != statuses(seed=7)
    assert set(first) == {200, 503}
    assert 5 <= first.count(503) <= 35


def test_fail_next_queue(srv: CrispServer, client: httpx.Client) -> None:
    srv.fail_next.extend([(422, "invalid_session"), (500, "server_error")])
    r1, r2, r3 = (client.get("/people/profiles/1") for _ in range(3))
    assert r1.status_code == 422
    assert r1.json() == {"error": True, "reason": "invalid_session", "data": {}}
    assert (r2.status_code, r2.json()["reason"]) == (500, "server_error")
    assert r3.status_code == 200
    assert srv.fail_next == []


def test_drop_connection(srv: CrispServer, client: httpx.Client) -> None:
    assert client.get("/people/profiles/1").status_code == 200  # pooled keep-alive connection
    srv.drop_connection_next = 2
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            client.post("/people/profile", json={"email": "drop@example.com"})
    assert srv.profiles == {}
    assert client.get("/people/profiles/1").status_code == 200
    assert [r.status for r in srv.requests] == [200, 0, 0, 200]


def test_latency(srv: CrispServer, client: httpx.Client) -> None:
    srv.latency = 0.2
    started = time.monotonic()
    assert client.get("/people/profiles/1").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_concurrent_requests_and_latency_overlap(srv: CrispServer) -> None:
    srv.latency = 0.2
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with make_client(srv) as c:
                create(c, f"t{i}@example.com")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Served in parallel: requests overlapped inside the server (no wall-clock bound, which a
    # loaded machine breaks).
    assert srv.peak_in_latency > 1
    assert len(srv.profiles) == 20
    assert srv.count("POST", "/people/profile") == 20


def test_keep_alive_reuses_one_connection(srv: CrispServer, client: httpx.Client) -> None:
    for i in range(10):
        create(client, f"k{i}@example.com")
    assert client.head("/people/profile/k1@example.com").status_code == 200
    assert client.get("/people/profiles/1").status_code == 200
    assert srv.connections == 1


def test_requests_are_recorded(srv: CrispServer, client: httpx.Client) -> None:
    people_id = create(client, "rec@example.com", nickname="R")
    client.patch(f"/people/data/{people_id}", json={"data": {"x": True}})
    client.get("/people/profiles/1", params={"search_text": "rec@example.com"})
    prefix = f"/v1/website/{WEBSITE}"
    assert srv.requests == [
        (
            "POST",
            f"{prefix}/people/profile",
            {"email": "rec@example.com", "person": {"nickname": "R"}},
            201,
        ),
        ("PATCH", f"{prefix}/people/data/{people_id}", {"data": {"x": True}}, 200),
        ("GET", f"{prefix}/people/profiles/1?search_text=rec@example.com", None, 200),
    ]
    method, path, body, status = srv.requests[0]
    assert (method, path, body["email"], status) == (
        "POST",
        f"{prefix}/people/profile",
        "rec@example.com",
        201,
    )
    assert srv.count() == 3
    assert srv.count("patch") == 1
    assert srv.count(path_contains="search_text") == 1
    srv.reset_counts()
    assert srv.count() == 0 and srv.requests == []
    assert people_id in srv.profiles
