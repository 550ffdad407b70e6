"""``track`` and ``read_calls``: Segment Track/Identify messages, here on the JSONL destination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config, write_csv

from audience_sync import IdentifyCall, SnapshotError, TrackEvent, load_config, read_calls, track


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
    calls = read_calls(source)
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
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
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
def test_read_calls_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    source = tmp_path / "calls.jsonl"
    source.write_text('{"type": "track", "userId": "u", "event": "ok"}\n' + line + "\n")
    with pytest.raises(SnapshotError) as info:
        read_calls(source)
    assert f"{source}:2: " in str(info.value) and message in str(info.value)
    with pytest.raises(SnapshotError, match="file not found"):
        read_calls(tmp_path / "missing.jsonl")
