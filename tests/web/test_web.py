"""The history pages without a browser: ``report --html`` and the ``ui`` server render the
seeded history (SQLite and PostgreSQL), escape what the database holds, send strict headers,
refuse writes, foreign Hosts and missing tokens, and leave the database as it was."""

from __future__ import annotations

import hashlib
import html as html_text
import http.client
import math
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import cli, crisp_env, execute, write_config
from history_seed import EVIL, EVIL_USER, Seeded, seed_history
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync.config import load_config
from audience_sync.history import status
from audience_sync.state import StateStore, connect, upgrade
from audience_sync.web import HistoryServer, open_history
from audience_sync.web.charts import HEIGHT, WIDTH, Series, bar_chart
from audience_sync.web.pages import Pages


def points(html: str, key: str) -> list[int]:
    """Points per chart in the audience card of ``key`` (two charts: changes, delivery)."""
    card = re.search(
        rf'<article class="card audience" data-key="{key}">(.*?)</article>', html, re.S
    )
    if card is None:
        return []
    return [c.count('<g class="point">') for c in card[1].split('<figure class="chart">')[1:]]


@contextmanager
def serving(seeded: Seeded, host: str = "127.0.0.1", token: str | None = None) -> Iterator[int]:
    history = open_history(seeded.config, seeded.config.state.url)
    server = HistoryServer(host, 0, Pages(history), token=token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        history.engine.dispose()


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    address: str = "127.0.0.1",
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(address, port, timeout=60)
    try:
        conn.request(method, path, headers={"Host": f"{address}:{port}", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def seeded(tmp_path: Path, state_url: str) -> Seeded:
    return seed_history(tmp_path, state_url)


def test_report_is_one_file_that_loads_nothing_and_shows_every_view(
    seeded: Seeded, tmp_path: Path
) -> None:
    out = tmp_path / "out.html"
    done = cli(
        "report", "--config", str(seeded.config_path), "--html", str(out), "--user", "u-1002"
    )
    assert done.returncode == 0, done.stderr
    html = out.read_text(encoding="utf-8")
    # Self-contained: no script, no external stylesheet or image, nothing with a URL to fetch.
    assert "<script" not in html.replace("&lt;script", "")
    assert not re.search(r"<[^>]*\s(src|srcset|action)=", html)
    assert not re.search(r"https?://", html)
    hrefs = set(re.findall(r'href="([^"]*)"', html))
    assert hrefs and all(h.startswith("#") or h == "data:," for h in hrefs), hrefs
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)
    assert csp is not None and html_text.unescape(csp[1]).startswith("default-src 'none';")
    for key, n in seeded.runs.items():
        assert points(html, key) == [n, n]
    for view in ("health", "runs", "quota", "retry", "user-u-1002"):
        assert f'<section id="{view}"' in html
    for run_id in (*seeded.run_ids["paying_customers"], *seeded.run_ids["churn_risk"]):
        assert f'<section id="run-{run_id}"' in html
    # Every database value is text: the hostile reason and user id never become markup.
    assert EVIL not in html and EVIL_USER not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    user = html.split('<section id="user-u-1002"')[1]
    assert user.count('<tr class="change">') == 3
    assert "server_error" in user


def test_report_refuses_a_bad_window_and_a_missing_database(tmp_path: Path, seeded: Seeded) -> None:
    bad = cli("report", "--config", str(seeded.config_path), "--html", "x.html", "--since", "soon")
    assert bad.returncode == 2 and "--since" in bad.stderr
    if seeded.config.state.url.startswith("sqlite"):
        missing = cli(
            "report", "--config", str(seeded.config_path), "--html", str(tmp_path / "y.html"),
            "--url", f"sqlite:///{tmp_path / 'nothing.db'}",
        )  # fmt: skip
        assert missing.returncode == 6 and "no state database" in missing.stderr
        assert not (tmp_path / "nothing.db").exists()


def test_run_detail_groups_failures_and_lists_rejected_rows(seeded: Seeded) -> None:
    with serving(seeded) as port:
        code, _, failed = request(port, f"/runs/{seeded.failed_run}")
        assert code == 200
        assert "server_error" in failed and "email required to create a profile" in failed
        assert re.search(r'<td class="num">1</td><td><span class="pill bad">failed</span>', failed)
        code, _, rejected = request(port, f"/runs/{seeded.rejected_run}")
        assert code == 200
        table = rejected.split('<table class="grid-table compact rejected">')[1]
        assert '<td class="num">11</td><td>-</td><td>user_id is empty &lt;script&gt;' in table
        assert request(port, "/runs/999999")[0] == 404


def test_without_the_rejected_rows_table_the_run_says_so(tmp_path: Path, state_url: str) -> None:
    seeded = seed_history(tmp_path, state_url, rejected_table=False)
    with serving(seeded) as port:
        _, _, html = request(port, f"/runs/{seeded.rejected_run}")
    assert "not recorded by this version" in html
    assert "(1 counted)" in html


def test_server_headers_methods_hosts_and_filters(seeded: Seeded) -> None:
    with serving(seeded) as port:
        code, headers, html = request(port, "/")
        assert code == 200
        csp = headers["Content-Security-Policy"]
        assert csp.startswith("default-src 'none'; style-src 'sha256-")
        assert "frame-ancestors 'none'" in csp and "script-src" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "<script" not in html.replace("&lt;script", "")
        assert html.count('<tr class="health-row"') == 2
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, headers, _ = request(port, "/", method=method)
            assert code == 405 and headers["Allow"] == "GET, HEAD"
        code, _, body = request(port, "/", method="HEAD")
        assert code == 200 and body == ""
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1"):
            code, headers, body = request(port, "/", headers={"Host": host})
            assert code == 403 and "Health" not in body
            assert "Content-Security-Policy" in headers
        assert request(port, "/", headers={"Host": f"localhost:{port}"})[0] == 200

        _, _, runs = request(port, "/runs?window=all")
        for key, n in seeded.runs.items():
            assert points(runs, key) == [n, n]
        _, _, one = request(port, "/runs?window=all&audience=churn_risk")
        assert points(one, "churn_risk") == [4, 4] and points(one, "paying_customers") == []
        _, _, day = request(port, "/runs?window=24h")
        assert points(day, "churn_risk") == [1, 1] and points(day, "paying_customers") == []
        assert request(port, "/runs?window=forever")[0] == 400
        assert request(port, "/nowhere")[0] == 404

        _, _, retry = request(port, "/retry")
        groups = retry.split('<table class="grid-table retry-groups">')[1].split("</table>")[0]
        assert '<td class="num">422</td>' in groups  # u-1002's 503 was retried and delivered
        assert EVIL not in retry and "&lt;script&gt;" in retry

        _, _, user = request(port, "/user?id=u-1002")
        assert user.count('<tr class="change">') == 3
        _, _, evil = request(port, "/user?id=" + "u-%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
        assert EVIL_USER not in evil and "u-&lt;img src=x onerror=alert(1)&gt;" in evil


def test_remote_server_needs_the_token_on_every_request(seeded: Seeded) -> None:
    with serving(seeded, host="0.0.0.0", token="s3cret-token") as port:
        assert request(port, "/")[0] == 401
        assert request(port, "/", headers={"Cookie": "audience_sync_ui=wrong"})[0] == 401
        code, headers, _ = request(port, "/runs?token=s3cret-token&window=7d")
        assert code == 303 and headers["Location"] == "/runs?window=7d"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert request(port, "/", headers={"Cookie": cookie})[0] == 200
        assert request(port, "/", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        # The token swap redirects within the site: never to "//host" or "/\\host".
        for path in ("////evil.example?token=s3cret-token", "/\\evil.example?token=s3cret-token"):
            code, headers, _ = request(port, path)
            assert code == 303 and re.match(r"/[^/\\]", headers["Location"]), headers
    with pytest.raises(ValueError, match="needs a token"):
        HistoryServer("0.0.0.0", 0, None, token=None)  # type: ignore[arg-type]
    refused = cli("ui", "--config", str(seeded.config_path), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    no_token = cli(
        "ui", "--config", str(seeded.config_path), "--host", "0.0.0.0", "--allow-remote",
        env={"AUDIENCE_SYNC_UI_TOKEN": ""},
    )  # fmt: skip
    assert no_token.returncode == 2 and "--token" in no_token.stderr


def test_another_loopback_address_accepts_its_own_printed_url(seeded: Seeded) -> None:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    with serving(seeded, host="127.0.0.2") as port:
        assert request(port, "/", address="127.0.0.2")[0] == 200
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.2:1"):
            assert request(port, "/", address="127.0.0.2", headers={"Host": host})[0] == 403


def test_pages_never_write_the_state_database(seeded: Seeded, tmp_path: Path) -> None:
    url = seeded.config.state.url
    db = Path(sa.make_url(url).database or "")
    before = hashlib.sha256(db.read_bytes()).hexdigest() if url.startswith("sqlite") else ""
    with serving(seeded) as port:
        for path in ("/", "/runs?window=all", f"/runs/{seeded.failed_run}", "/quota", "/retry"):
            assert request(port, path)[0] == 200
    cli("report", "--config", str(seeded.config_path), "--html", str(tmp_path / "r.html"))
    if url.startswith("sqlite"):
        assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    # The engine the pages use is refused writes by the database itself.
    engine = connect(url, read_only=True)
    try:
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM sync_changes"))
    finally:
        engine.dispose()


def test_quota_draws_the_budget_line_and_estimates_days(tmp_path: Path, state_url: str) -> None:
    (tmp_path / "a.csv").write_text("user_id\nu1\n", encoding="utf-8")
    path = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "A", "source": "a.csv"}],
        destination={
            "type": "crisp",
            "name": "crisp-main",
            "website_id": "w1",
            "daily_request_budget": 1000,
        },
    )
    config = load_config(path, env=crisp_env())
    engine = connect(state_url)
    upgrade(engine)
    engine.dispose()
    now = datetime.now(UTC)
    today = now.date()
    execute(
        state_url,
        "INSERT INTO destination_requests (destination, day, used, updated_at) "
        "VALUES (:d, :day, :used, :at)",
        [
            {"d": "crisp-main", "day": today - timedelta(days=i), "used": used, "at": now}
            for i, used in ((0, 400), (1, 1000), (3, 250))
        ],
    )
    execute(
        state_url,
        "INSERT INTO sync_audiences (destination, audience_key, audience_name, created_at) "
        "VALUES ('crisp-main', 'a', 'A', :at)",
        [{"at": now}],
    )
    execute(
        state_url,
        "INSERT INTO sync_pending (audience_id, user_id, value, status, reason, status_code, "
        "retryable, input_hash, message_id, attempts, first_run_id, last_run_id, first_at, "
        "last_at) VALUES (1, :u, true, 'pending', 'quota', NULL, true, 'h', 'm', 1, 1, 1, :at, "
        ":at)",
        [{"u": f"u{i}", "at": now} for i in range(2100)],
    )
    history = open_history(config, state_url)
    try:
        html = Pages(history).quota_section()
    finally:
        history.engine.dispose()
    card = html.split('data-destination="crisp-main"')[1]
    assert card.count('<g class="point">') == 14  # one per UTC day of the window
    assert 'class="limit"' in card and "daily budget 1,000" in card
    # 2,100 pending, 600 left today, then 1,000 a day: today and two more days.
    assert '<span class="n">2,100</span><span class="label">users pending' in card
    assert '<span class="n">3</span><span class="label">days to finish' in card


def test_health_strip_and_late_then_overdue(seeded: Seeded) -> None:
    engine = sa.create_engine(seeded.config.state.url)
    try:
        run = StateStore(engine).run(max(seeded.run_ids["paying_customers"]))
        assert run is not None
        at = run["started_at"]
        grace = seeded.config.service.overdue_after
        states = {
            hours: {
                a.audience.trait_key: a
                for a in status(
                    seeded.config, engine, now=at + timedelta(hours=hours) + grace, recent=20
                ).audiences
            }["paying_customers"]
            for hours in (5, 7, 13)
        }
    finally:
        engine.dispose()
    # The last run failed: that outranks lateness, but the missed runs are still counted.
    assert [states[h].missed for h in (5, 7, 13)] == [0, 1, 2]
    assert all(s.state == "failing" for s in states.values())
    assert [r["status"] for r in reversed(states[5].recent)] == [
        "succeeded", "partial", "succeeded", "failed",
    ]  # fmt: skip


def test_other_commands_do_not_import_jinja2_or_the_pages() -> None:
    probe = (
        "import sys, audience_sync.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('jinja2', 'audience_sync.web'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
        max_size=80,
    ),
    st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_bars_stay_in_the_chart_and_scale_with_their_values(
    values: list[tuple[int, int, int]], limit: int | None
) -> None:
    series = (Series("a", "a", "a"), Series("b", "b", "b"), Series("c", "c", "c", down=True))
    items = [({"a": a, "b": b, "c": c}, "", None, "") for a, b, c in values]
    chart = bar_chart("t", series, items, limit=limit)
    assert len(chart.points) == len(values)
    ratios = []
    for point, (a, b, c) in zip(chart.points, values, strict=True):
        assert len(point.bars) == sum(v > 0 for v in (a, b, c))
        for bar, value in zip(point.bars, [v for v in (a, b, c) if v > 0], strict=True):
            assert bar.x >= 0 and bar.x + bar.width <= WIDTH
            assert bar.y - 1e-6 >= 0 and bar.y + bar.height <= HEIGHT + 1e-6
            ratios.append(bar.height / value)
    assert all(math.isclose(r, ratios[0]) for r in ratios)  # one scale for every bar
    if limit is not None:
        assert chart.limit is not None and 0 <= chart.limit[0] <= chart.zero
