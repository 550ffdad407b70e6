"""The run's changes between the diff and the destination: message ids, identities, batches of
whole users, the retry queue, and the two shapes a destination can take them in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from audience_sync import changes
from audience_sync.changes import AudienceChanges, ChangeSpool, RunChanges, input_hash
from audience_sync.destinations.base import Destination, DestinationSettings
from audience_sync.destinations.jsonl import JsonlDestination, JsonlSettings, identify_lines
from audience_sync.diff import plan
from audience_sync.messageids import MESSAGE_NAMESPACE, message_ids
from audience_sync.model import IDENTITY_TRAITS, Change, ChangeBatch, Identity, UserUpdate

# Text a snapshot may hold: quotes, backslashes, control characters, non-ASCII, emoji.
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
IDS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


def strict_json(line: str) -> dict[str, object]:
    """``json.loads`` that refuses an object with a repeated key (it would keep the last)."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"repeated key in {line!r}"
        return dict(pairs)

    loaded: dict[str, object] = json.loads(line, object_pairs_hook=unique)
    return loaded


def ids(values: Iterable[str]) -> pd.Index:
    return pd.Index(pd.array(list(values), dtype="string[pyarrow]"), name="user_id")


def identities(rows: dict[str, dict[str, str | None]], order: pd.Index) -> pd.DataFrame:
    """Identity rows for ``order`` (entered then resend), from ``rows`` by user id."""
    columns = sorted({t for r in rows.values() for t in r})
    frame = pd.DataFrame(
        {t: [rows.get(u, {}).get(t) for u in order] for t in columns}, index=order, dtype="string"
    )
    return frame.astype("string[pyarrow]")


def audience(
    key: str,
    *,
    members: list[str],
    synced: list[str] = (),  # type: ignore[assignment]
    traits: dict[str, dict[str, str | None]] | None = None,
    run_id: int = 7,
    retry: pd.DataFrame | None = None,
) -> AudienceChanges:
    p = plan(ids(members), ids(synced))
    sent = p.entered.append(p.resend)
    return AudienceChanges(
        key,
        key.upper(),
        run_id,
        p,
        identities(traits or {}, sent),
        retry if retry is not None else pd.DataFrame(index=ids([])),
    )


def all_updates(changes: RunChanges, users: int = 1000) -> list[UserUpdate]:
    return [u for b in changes.batches(users) for u in b.updates()]


# -- message ids ------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(TEXT, max_size=30))
def test_message_ids_are_rfc_4122_uuid5_of_their_key(keys: list[str]) -> None:
    with duckdb.connect() as con:
        got = message_ids(pa.array(keys, pa.string()), con).to_pylist()
    assert got == [str(uuid.uuid5(MESSAGE_NAMESPACE, k)) for k in keys]


def test_a_change_message_id_derives_from_destination_audience_user_value_and_run() -> None:
    changes = RunChanges(
        "crisp", [audience("vip", members=["u1"], synced=["u2"], run_id=12)], retry_failed=False
    )
    sent = {(u.user_id, c.value): c.message_id for u in all_updates(changes) for c in u.changes}
    assert sent == {
        ("u1", True): str(uuid.uuid5(MESSAGE_NAMESPACE, "crisp\x1fvip\x1fu1\x1fTrue\x1f12")),
        ("u2", False): str(uuid.uuid5(MESSAGE_NAMESPACE, "crisp\x1fvip\x1fu2\x1fFalse\x1f12")),
    }


# -- merging, identities and batches ----------------------------------------------------------


def test_a_user_gets_one_update_with_every_audience_and_the_first_known_trait_wins() -> None:
    changes = RunChanges(
        "jsonl",
        [
            audience("a", members=[], synced=["u1"]),  # u1 leaves a: no identity of its own
            audience("b", members=["u1", "u2"], traits={"u1": {"name": "B1"}, "u2": {}}),
            audience(
                "c",
                members=["u1"],
                traits={"u1": {"name": "C1", "email": "c1@x"}},
            ),
        ],
        retry_failed=False,
    )
    updates = {u.user_id: u for u in all_updates(changes)}
    assert [(c.audience_key, c.value) for c in updates["u1"].changes] == [
        ("a", False),
        ("b", True),
        ("c", True),
    ]
    assert updates["u1"].identity == Identity(email="c1@x", name="B1")
    assert updates["u2"].identity == Identity()
    assert (changes.users, changes.changes, changes.held_users) == (2, 4, 0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sets(st.sampled_from([f"u{i}" for i in range(25)])), min_size=1, max_size=4),
    st.lists(st.sets(st.sampled_from([f"u{i}" for i in range(25)])), min_size=4, max_size=4),
    st.integers(min_value=1, max_value=30),
)
def test_batches_hold_whole_users_and_every_change_exactly_once(
    members: list[set[str]], synced: list[set[str]], size: int
) -> None:
    audiences = [
        audience(f"a{i}", members=sorted(m), synced=sorted(synced[i]))
        for i, m in enumerate(members)
    ]
    changes = RunChanges("jsonl", audiences, retry_failed=False)
    batches = list(changes.batches(size))
    seen: list[str] = []
    for batch in batches:
        users = batch.table.column("user_id").to_pylist()
        assert 1 <= batch.users <= size and batch.users == len(set(users))
        assert not set(users) & set(seen)  # a user is never split between batches
        seen += list(dict.fromkeys(users))
    expected = {(u, a.key, True) for a in audiences for u in a.plan.entered} | {
        (u, a.key, False) for a in audiences for u in a.plan.exited
    }
    got = {
        (u.user_id, c.audience_key, c.value)
        for b in batches
        for u in b.updates()
        for c in u.changes
    }
    assert got == expected
    assert sum(b.users for b in batches) == changes.users == len({u for u, _, _ in expected})
    assert sum(len(b) for b in batches) == changes.changes == len(expected)


# -- the retry queue --------------------------------------------------------------------------


def retry_row(user: str, *, value: bool, identity: Identity, retryable: bool) -> dict[str, object]:
    return {
        "user_id": user,
        "value": value,
        "status": "failed",
        "retryable": retryable,
        "input_hash": input_hash(value, identity),
        "message_id": f"first-id-of-{user}",
    }


def test_queued_changes_keep_their_first_message_id_and_permanent_failures_are_held() -> None:
    same = Identity(email="same@x")
    queue = pd.DataFrame(
        [
            retry_row("temporary", value=True, identity=same, retryable=True),
            retry_row("permanent", value=True, identity=same, retryable=False),
            retry_row("fixed", value=True, identity=Identity(email="old@x"), retryable=False),
        ]
    ).set_index("user_id")
    members = ["temporary", "permanent", "fixed", "new"]
    traits = {u: {"email": "same@x"} for u in members} | {"fixed": {"email": "new@x"}}

    def run(retry_failed: bool) -> tuple[RunChanges, dict[str, str]]:
        changes = RunChanges(
            "jsonl",
            [audience("a", members=members, traits=traits, retry=queue)],
            retry_failed=retry_failed,
        )
        return changes, {u.user_id: u.changes[0].message_id for u in all_updates(changes)}

    changes, sent = run(retry_failed=False)
    assert set(sent) == {"temporary", "fixed", "new"}  # `permanent`: same data, held
    assert sent["temporary"] == "first-id-of-temporary"
    assert sent["fixed"] == "first-id-of-fixed"
    assert sent["new"] == str(uuid.uuid5(MESSAGE_NAMESPACE, "jsonl\x1fa\x1fnew\x1fTrue\x1f7"))
    assert (changes.held, changes.held_users, changes.users) == ([1], 1, 3)

    changes, sent = run(retry_failed=True)
    assert sent["permanent"] == "first-id-of-permanent"
    assert (changes.held, changes.held_users, changes.users) == ([0], 0, 4)


# -- ChangeBatch <-> UserUpdate ---------------------------------------------------------------

IDENTITIES = st.builds(Identity, *(st.none() | TEXT for _ in IDENTITY_TRAITS))
UPDATES = st.dictionaries(
    IDS,
    st.tuples(
        IDENTITIES,
        st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans()),
            min_size=1,
            max_size=3,
            unique_by=lambda c: c[0],
        ),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(UPDATES)
def test_a_batch_and_its_per_user_updates_convert_both_ways(
    spec: dict[str, tuple[Identity, list[tuple[str, bool]]]],
) -> None:
    updates = [
        UserUpdate(
            user,
            identity,
            tuple(Change(k, k.upper(), v, f"id-{user}-{k}") for k, v in changes),
        )
        for user, (identity, changes) in spec.items()
    ]
    batch = ChangeBatch.from_updates(updates)
    assert batch.users == len(updates) and len(batch) == sum(len(u.changes) for u in updates)
    assert list(batch.updates()) == updates


# -- the JSONL lines --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(UPDATES, st.sampled_from(["space", 'quo"te\\']))
def test_every_jsonl_line_is_the_segment_identify_of_its_change(
    spec: dict[str, tuple[Identity, list[tuple[str, bool]]]], space: str
) -> None:
    updates = [
        UserUpdate(u, identity, tuple(Change(k, k, v, f"m-{u}-{k}") for k, v in changes))
        for u, (identity, changes) in spec.items()
    ]
    batch = ChangeBatch.from_updates(updates)
    with duckdb.connect() as con:
        lines = identify_lines(batch, space_id=space, timestamp="2026-12-01T00:00:00Z", con=con)
    text = "".join(lines.to_pylist())
    assert text.count("\n") == len(batch) and (not text or text.endswith("\n"))
    # Split on newlines only: JSON leaves U+0085 or U+2028 unescaped, str.splitlines does not.
    messages = [strict_json(line) for line in text.split("\n")[:-1]]
    expected = [
        {
            "type": "identify",
            "userId": u.user_id,
            "traits": {**u.identity.traits(), c.audience_key: c.value},
            "messageId": c.message_id,
            "timestamp": "2026-12-01T00:00:00Z",
            "integrations": {"All": False, "Crisp": True},
        }
        for u in updates
        for c in u.changes
    ]
    assert [{k: v for k, v in m.items() if k != "context"} for m in messages] == expected
    changes = [c for u in updates for c in u.changes]
    for message, c in zip(messages, changes, strict=True):
        personas = message["context"]["personas"]
        assert personas["computation_key"] == c.audience_key
        assert (personas["space_id"], personas["namespace"]) == (space, f"spa_{space}")
        assert personas["computation_class"] == "audience"


def test_an_audience_whose_key_is_an_identity_trait_sets_that_trait_once() -> None:
    update = UserUpdate(
        "u1", Identity(email="a@x", name="Ada"), (Change("email", "Email", True, "m1"),)
    )
    with duckdb.connect() as con:
        lines = identify_lines(
            ChangeBatch.from_updates([update]), space_id="s", timestamp="t", con=con
        )
    assert strict_json(lines.to_pylist()[0])["traits"] == {"email": True, "name": "Ada"}


# -- destinations in either shape -------------------------------------------------------------


class _Settings(DestinationSettings):
    pass


def test_a_batch_destination_also_takes_per_user_updates(tmp_path: Path) -> None:
    dest = JsonlDestination(
        JsonlSettings(path=tmp_path / "out.jsonl", flush_every=2),
        name="jsonl",
        config_dir=tmp_path,
    )
    updates = [
        UserUpdate(f"u{i}", Identity(), (Change("a", "A", True, f"m{i}"),)) for i in range(5)
    ]

    async def deliver() -> list[list[str]]:
        async with dest:
            return [[o.user_id for o in outcomes] async for outcomes in dest.deliver(updates)]

    assert dest.takes_batches
    assert asyncio.run(deliver()) == [["u0", "u1"], ["u2", "u3"], ["u4"]]
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["userId"] for line in lines] == [f"u{i}" for i in range(5)]


def test_a_destination_must_implement_one_of_the_two_shapes() -> None:
    class Nothing(Destination):
        kind = "nothing"
        settings_model = _Settings

    dest = Nothing(_Settings(), name="n", config_dir=Path())
    assert not dest.takes_batches

    async def deliver() -> AsyncGenerator[object, None]:
        async for outcomes in dest.deliver([]):
            yield outcomes

    with pytest.raises(NotImplementedError, match="implements no deliver method"):
        asyncio.run(anext(deliver()))


# -- spilled to disk: the same batches ------------------------------------------------------

# Ids a snapshot may hold (printable: validation rejects the rest), in cases and scripts whose
# byte order differs from a locale's, so both sorts must agree on it.
SPILL_IDS = ["u1", "U1", "u10", "u2", "a b", "é", "z", "Ω", "😀", "ab", "a", "B"]
QUEUE_ROW = st.tuples(
    st.sampled_from(SPILL_IDS),
    st.booleans(),  # queued value
    st.booleans(),  # retryable
    st.sampled_from(["failed", "skipped"]),
    st.booleans(),  # the fingerprint matches the user's email (held when permanent)
)
AUDIENCE_SPEC = st.tuples(
    st.sets(st.sampled_from(SPILL_IDS)),  # members
    st.sets(st.sampled_from(SPILL_IDS)),  # synced
    st.booleans(),  # full: re-send the unchanged members
    st.sampled_from([(), ("email",), ("email", "name"), ("phone",)]),  # identity columns
    st.lists(QUEUE_ROW, max_size=5, unique_by=lambda r: r[0]),
)


def spill_audience(
    i: int,
    spec: tuple[set[str], set[str], bool, tuple[str, ...], list[tuple[str, bool, bool, str, bool]]],
) -> AudienceChanges:
    members, synced, full, columns, queue = spec
    p = plan(ids(sorted(members)), ids(sorted(synced)), full=full)
    sent = p.entered.append(p.resend)
    traits = {
        u: {t: f"{t}-{u}-{i % 2}" if (len(u) + i) % 3 else None for t in columns} for u in sent
    }
    retry = pd.DataFrame(
        [
            {
                "user_id": u,
                "value": value,
                "status": status,
                "retryable": retryable,
                "input_hash": input_hash(value, Identity(email=f"email-{u}-0" if same else "x")),
                "message_id": f"kept-{i}-{u}",
            }
            for u, value, retryable, status, same in queue
        ],
        columns=["user_id", "value", "status", "retryable", "input_hash", "message_id"],
    ).set_index("user_id")
    return AudienceChanges(
        f"k{i}",
        f"K{i}",
        10 + i,
        p,
        identities(traits, sent) if columns else identities({}, sent),
        retry,
    )


@settings(max_examples=60, deadline=None)
# Found by hypothesis: U1's email is only on a held change (k0), yet goes out with its exit
# from k1, as in memory; the spilled batches had dropped it with the held row.
@example(
    specs=[
        ({"U1", "u1"}, set(), False, ("email",), [("U1", True, False, "failed", True)]),
        (set(), {"U1", "u1"}, False, (), []),
    ],
    size=1,
    spill_at=0,
    retry_failed=False,
)
@given(
    st.lists(AUDIENCE_SPEC, min_size=1, max_size=4),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=0, max_value=30),
    st.booleans(),
)
def test_spilled_changes_give_exactly_the_batches_kept_in_memory(
    specs: list[
        tuple[set[str], set[str], bool, tuple[str, ...], list[tuple[str, bool, bool, str, bool]]]
    ],
    size: int,
    spill_at: int,
    retry_failed: bool,
) -> None:
    audiences = [spill_audience(i, spec) for i, spec in enumerate(specs)]
    in_memory = RunChanges("crisp", audiences, retry_failed=retry_failed)
    spool = ChangeSpool(spill_at=spill_at)
    for a in audiences:
        spool.add(a)
    spilled = RunChanges("crisp", audiences, retry_failed=retry_failed, spool=spool)
    try:
        assert spool.spilled == (spool.rows > spill_at)
        expected, got = list(in_memory.batches(size)), list(spilled.batches(size))
        assert [b.users for b in got] == [b.users for b in expected]
        for g, e in zip(got, expected, strict=True):
            assert g.table.equals(e.table), (g.table.to_pylist(), e.table.to_pylist())
        counts = ("users", "changes", "held", "held_users")
        assert [getattr(spilled, c) for c in counts] == [getattr(in_memory, c) for c in counts]
        # Every re-sent change is flagged for the ledger, in both.
        resent = [{u for u in a.plan.resend} for a in audiences]
        assert spilled.resent == in_memory.resent
        assert all(r <= full for r, full in zip(in_memory.resent, resent, strict=True))
    finally:
        folder = spool._dir.name if spool._dir is not None else None
        spool.close()
        assert folder is None or not Path(folder).exists()  # the spilled file is removed


def test_spilled_changes_are_added_under_a_small_memory_limit_and_sorted_under_a_larger_one() -> (
    None
):
    """DuckDB caches a table's blocks up to its memory limit: while audiences are added (each
    planned beside the spool) the spool may hold only SPILL_ADD_MEMORY, so its cache does not
    grow with every audience under the next one's planning; the sort then gets SPILL_MEMORY."""

    def limit(con: duckdb.DuckDBPyConnection) -> str:
        [(value,)] = con.sql("SELECT current_setting('memory_limit')").fetchall()
        return str(value)

    def as_set(size: str) -> str:  # DuckDB's own spelling of a limit
        with duckdb.connect(":memory:") as con:
            con.sql(f"SET memory_limit = '{size}'")
            return limit(con)

    assert as_set(changes.SPILL_ADD_MEMORY) != as_set(changes.SPILL_MEMORY)
    audiences = [
        spill_audience(i, ({"u1", "u2", "z"}, {"a"}, False, ("email",), [])) for i in range(3)
    ]
    spool = ChangeSpool(spill_at=0)
    try:
        for a in audiences:
            spool.add(a)
            assert spool.con is not None
            assert limit(spool.con) == as_set(changes.SPILL_ADD_MEMORY)
        run = RunChanges("crisp", audiences, retry_failed=False, spool=spool)
        assert limit(spool.con) == as_set(changes.SPILL_MEMORY)
        assert sum(b.users for b in run.batches(2)) == 4
    finally:
        spool.close()
