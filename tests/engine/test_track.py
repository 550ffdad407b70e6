"""``track`` and ``read_calls``: Segment Track/Identify messages, here on the JSONL destination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, read_jsonl, write_config, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync import IdentifyCall, SnapshotError, TrackEvent, load_config, read_calls, track
from audience_sync.track import sends_here


def test_read_calls_and_track_to_jsonl(tmp_path: Path, state_url: str) -> None:
    write_csv(tmp_path / "a.csv", "user_id\n1\n")
    config = write_config(
        tmp_path / "c.toml", state_url=state_url, audiences=[{"name": "A", "source": "a.csv"}]
    )
    source = tmp_path / "calls.jsonl"
    source.write_text(
        json.dumps({"type": "identify", "userId": "u1", "traits": {"email": "a@x.com"}})
        + "\n\n"
        + json.dumps(
            {
                "type": "track",
                "userId": 7,
                "event": "Completed Purchase",
                "properties": {"revenue": 42.99},
                "context": {"traits": {"email": "b@x.com"}},
            }
        )
        + "\n"
    )
    calls = read_calls(source).calls
    assert calls == [
        IdentifyCall(user_id="u1", traits={"email": "a@x.com"}),
        TrackEvent(
            user_id="7",
            event="Completed Purchase",
            properties={"revenue": 42.99},
            email="b@x.com",
        ),
    ]
    result = track(load_config(config), calls)
    assert result.exit_code == 0 and result.counts["delivered"] == 2
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert [(m["type"], m["userId"]) for m in lines] == [("identify", "u1"), ("track", "7")]
    assert lines[1]["properties"] == {"revenue": 42.99}
    assert lines[1]["context"] == {"traits": {"email": "b@x.com"}}
    assert lines[0]["integrations"] == {"All": False, "Crisp": True}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"type": "page", "userId": "u"}', "only 'track' and 'identify' are sent"),
        ('{"type": "track", "anonymousId": "a", "event": "E"}', "`userId` is missing"),
        ('{"type": "track", "userId": "u"}', "needs a non-empty `event`"),
        ('{"type": "track", "userId": "u", "event": "E", "properties": 3}', "`properties`"),
        ('{"type": "identify", "userId": "u", "traits": []}', "`traits` must be an object"),
    ],
)
def test_a_bad_line_is_skipped_with_its_number(tmp_path: Path, line: str, message: str) -> None:
    """15.6: a bad line is reported and skipped; the rest of the file is still read."""
    source = tmp_path / "calls.jsonl"
    ok = '{"type": "track", "userId": "u", "event": "ok"}\n'
    source.write_text(ok + line + "\n" + ok)
    read = read_calls(source)
    assert [c.user_id for c in read.calls] == ["u", "u"]
    [skipped] = read.skipped
    assert skipped.line == 2 and message in skipped.reason
    with pytest.raises(SnapshotError, match="file not found"):
        read_calls(tmp_path / "missing.jsonl")


def message(user: str, integrations: object = None) -> str:
    body: dict[str, object] = {"type": "track", "userId": user, "event": "Paid"}
    if integrations is not None:
        body["integrations"] = integrations
    return json.dumps(body)


@given(
    st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["All", "Crisp", "Intercom"]),
            st.one_of(st.booleans(), st.just({"option": 1})),
        ),
    )
)
@settings(max_examples=60, deadline=None)
def test_integrations_decide_as_segment_does(integrations: dict[str, object] | None) -> None:
    """The destination's own key decides when present (anything but false turns it on), else
    "All" (on by default); other destinations' keys do not matter."""
    own = (integrations or {}).get("Crisp")
    expected = own is not False if own is not None else (integrations or {}).get("All") is not False
    assert sends_here(json.loads(message("u", integrations))) is expected


def test_track_file_honours_integrations_and_skips_bad_lines(
    tmp_path: Path, state_url: str
) -> None:
    write_csv(tmp_path / "a.csv", "user_id\n1\n")
    config = write_config(
        tmp_path / "c.toml", state_url=state_url, audiences=[{"name": "A", "source": "a.csv"}]
    )
    source = tmp_path / "calls.jsonl"
    source.write_text(
        "\n".join(
            [
                message("u1"),
                message("u2", {"Crisp": False}),
                '{"type": "page", "userId": "u3", "name": "Home"}',
                message("u4", {"All": False}),
                message("u5", {"All": False, "Crisp": True}),
                message("u6", {"All": False, "Crisp": {"note": "options turn it on"}}),
                '{"type": "track", "anonymousId": "a7", "event": "Paid"}',
                "{oops",
            ]
        )
        + "\n"
    )
    done = cli("track", "--config", str(config), "--file", str(source), "--json")
    assert done.returncode == 5, done.stdout + done.stderr  # some lines were skipped
    report = json.loads(done.stdout)
    assert (report["calls"], report["delivered"], report["integrations_off"]) == (3, 3, 2)
    assert [x["line"] for x in report["skipped_lines"]] == [3, 7, 8]
    assert "`userId` is missing" in report["skipped_lines"][1]["reason"]
    sent = [m["userId"] for m in read_jsonl(tmp_path / "out.jsonl")]
    assert sent == ["u1", "u5", "u6"]
    table = cli("track", "--config", str(config), "--file", str(source))
    assert f"{source}:3: skipped: `type` is 'page'" in table.stdout
    assert "2 x left out: its `integrations` turn Crisp off" in table.stdout

    clean = tmp_path / "clean.jsonl"
    clean.write_text(message("u1") + "\n" + message("u2", {"Crisp": False}) + "\n")
    assert cli("track", "--config", str(config), "--file", str(clean)).returncode == 0
