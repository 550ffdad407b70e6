"""Tests for audience_sync.diff: the pure plan, on small examples and against a set-based model."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync.diff import Plan, RepeatedIds, plan
from audience_sync.repeats import has_repeated


def index(ids: Iterable[str]) -> pd.Index:
    """User ids as the sources and the state store give them: text, unique."""
    return pd.Index(list(ids), dtype="string[pyarrow]", name="user_id")


def as_lists(p: Plan) -> tuple[list[str], list[str], list[str], int]:
    return list(p.entered), list(p.exited), list(p.resend), p.unchanged


def test_incremental_sends_only_changes() -> None:
    p = plan(index(["1", "2", "3", "5"]), index(["2", "3", "4", "6"]))
    assert as_lists(p) == (["1", "5"], ["4", "6"], [], 2)
    assert p.sends == 4


def test_entered_keeps_snapshot_order_and_exited_state_order() -> None:
    p = plan(index(["z", "a", "m"]), index(["q", "b", "a"]))
    assert list(p.entered) == ["z", "m"]
    assert list(p.exited) == ["q", "b"]


def test_nothing_changed_sends_nothing() -> None:
    p = plan(index(["1", "2"]), index(["2", "1"]))
    assert as_lists(p) == ([], [], [], 2)
    assert p.sends == 0


def test_first_sync_enters_every_member() -> None:
    p = plan(index(["007", "7", "a"]), index([]))
    assert as_lists(p) == (["007", "7", "a"], [], [], 0)
    assert p.sends == 3


def test_ids_compare_as_text() -> None:
    # "007" and "7" are two users: the state's "7" leaves, the snapshot's "007" enters.
    p = plan(index(["007"]), index(["7"]))
    assert as_lists(p) == (["007"], ["7"], [], 0)


def test_empty_snapshot_exits_everyone() -> None:
    p = plan(index([]), index(["1", "2"]))
    assert as_lists(p) == ([], ["1", "2"], [], 0)


def test_both_empty() -> None:
    p = plan(index([]), index([]))
    assert as_lists(p) == ([], [], [], 0)
    assert p.sends == 0


def test_full_resends_unchanged_and_exits_leavers() -> None:
    p = plan(index(["1", "2", "3"]), index(["2", "3", "4"]), full=True)
    assert list(p.entered) == ["1"]
    assert list(p.resend) == ["2", "3"]
    assert list(p.exited) == ["4"]
    assert p.unchanged == 2
    assert p.sends == 4  # true to 1, 2, 3 and false to 4


def test_full_of_a_synced_audience_resends_the_snapshot_rows_uncopied() -> None:
    # Nobody enters, so every member is re-sent in the snapshot's order: the plan holds the
    # snapshot's own rows and ids, not a copy beside them (the peak of a --full of 20M).
    rows = pd.DataFrame(
        {"email": pd.array(["b@x.io", "a@x.io", "c@x.io"], dtype="string[pyarrow]")},
        index=index(["b", "a", "c"]),
    )
    p = plan(rows, index(["a", "c", "d", "b"]), full=True)
    assert as_lists(p) == ([], ["d"], ["b", "a", "c"], 3)
    assert p.sent is rows
    assert p.resend is rows.index
    # One member entering takes the general path: entered first, then the re-sent, copied.
    q = plan(rows, index(["a", "d"]), full=True)
    assert as_lists(q) == (["b", "c"], ["d"], ["a"], 1)
    assert list(q.sent.index) == ["b", "c", "a"]
    assert list(q.sent["email"]) == ["b@x.io", "c@x.io", "a@x.io"]


def test_full_on_first_sync_is_all_entered() -> None:
    p = plan(index(["1", "2"]), index([]), full=True)
    assert as_lists(p) == (["1", "2"], [], [], 0)


def test_held_users_neither_enter_nor_exit() -> None:
    # "3" is held: its snapshot rows conflict, so it is not among the members. It stays as the
    # state says (a member) instead of being sent `false`; the held "9" is not in the state and
    # is not sent `true` either.
    p = plan(index(["1", "2"]), index(["2", "3", "4"]), held={"3", "9"})
    assert as_lists(p) == (["1"], ["4"], [], 2)  # unchanged: 2 and the held 3


def test_held_users_are_not_resent_in_full_mode() -> None:
    p = plan(index(["1", "2"]), index(["2", "3"]), full=True, held=frozenset({"3"}))
    assert as_lists(p) == (["1"], [], ["2"], 2)


def test_plan_is_pure() -> None:
    members, synced = index(["1", "2"]), index(["2", "3"])
    first = as_lists(plan(members, synced, full=True, held=["3"]))
    assert first == as_lists(plan(members, synced, full=True, held=["3"]))
    assert list(members) == ["1", "2"]
    assert list(synced) == ["2", "3"]


def test_accepts_a_state_index_of_another_dtype() -> None:
    p = plan(index(["1", "2"]), pd.Index(["2", "3"], dtype=object))
    assert as_lists(p) == (["1"], ["3"], [], 1)


# --- property: the fast diff agrees with plain sets ------------------------------------------

ids = st.text(alphabet="0a7_ ", min_size=1, max_size=4)


@st.composite
def diff_inputs(draw: st.DrawFn) -> tuple[list[str], list[str], set[str], bool]:
    members = draw(st.lists(ids, unique=True, max_size=30))
    synced = draw(st.lists(ids, unique=True, max_size=30))
    # Held users had conflicting rows, so they are never among the snapshot's members; they may
    # or may not be in the state.
    held = draw(st.sets(ids, max_size=10)) - set(members)
    return members, synced, held, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(diff_inputs())
def test_plan_matches_set_model(case: tuple[list[str], list[str], set[str], bool]) -> None:
    members, synced, held, full = case
    p = plan(index(members), index(synced), full=full, held=held)

    m, s = set(members), set(synced)
    entered = m - s
    exited = s - m - held
    resend = (m & s) if full else set()
    assert set(p.entered) == entered
    assert set(p.exited) == exited
    assert set(p.resend) == resend
    assert p.unchanged == len(s - exited)
    assert p.sends == len(entered) + len(exited) + len(resend)
    # No user is sent twice, nor both `true` and `false`.
    sent = [*p.entered, *p.resend, *p.exited]
    assert len(sent) == len(set(sent))
    # Orders are the inputs' orders, so a sample shown to the operator is stable.
    assert list(p.entered) == [u for u in members if u in entered]
    assert list(p.exited) == [u for u in synced if u in exited]
    # Applying the plan to the state gives the snapshot's members plus the held state members.
    after = (s | set(p.entered) | set(p.resend)) - set(p.exited)
    assert after == m | (s & held)


def chunked(values: list[str], cuts: list[int], *, name: str) -> pd.api.extensions.ExtensionArray:
    """``values`` as a pyarrow-backed string array in the chunks ``cuts`` make, as a
    Parquet file read in row groups gives them."""
    bounds = sorted({0, len(values), *(c % (len(values) + 1) for c in cuts)})
    chunks = [pa.array(values[a:b], pa.large_string()) for a, b in itertools.pairwise(bounds)]
    array = pa.chunked_array(chunks, pa.large_string())
    return pd.array(
        array, dtype="string[pyarrow]" if name == "user_id" else pd.ArrowDtype(array.type)
    )


@settings(max_examples=200, deadline=None)
@given(
    case=diff_inputs(),
    member_cuts=st.lists(st.integers(0, 31), max_size=4),
    synced_cuts=st.lists(st.integers(0, 31), max_size=4),
)
def test_a_plan_over_chunked_arrays_is_the_plan_over_whole_ones(
    case: tuple[list[str], list[str], set[str], bool],
    member_cuts: list[int],
    synced_cuts: list[int],
) -> None:
    """Snapshots and states arrive in several Arrow chunks; the plan takes its rows chunk by
    chunk (``diff._take``) and must give exactly what it gives over one chunk: the same ids in
    the same order, and each sent row the row of its own user."""
    members, synced, held, full = case
    emails = [f"{u}@example.com" for u in members]

    def rows(cuts: list[int] | None) -> pd.DataFrame:
        if cuts is None:
            return pd.DataFrame(
                {"email": pd.array(emails, dtype=pd.ArrowDtype(pa.large_string()))},
                index=index(members),
            )
        return pd.DataFrame(
            {"email": chunked(emails, cuts, name="email")},
            index=pd.Index(chunked(members, cuts, name="user_id"), name="user_id"),
        )

    split = plan(
        rows(member_cuts),
        pd.Index(chunked(synced, synced_cuts, name="user_id"), name="user_id"),
        full=full,
        held=held,
    )
    whole = plan(rows(None), index(synced), full=full, held=held)
    assert as_lists(split) == as_lists(whole)
    assert list(split.sent.index) == [*whole.entered, *whole.resend]
    assert list(split.sent["email"]) == [f"{u}@example.com" for u in split.sent.index]
    assert split.sent.index.dtype == whole.sent.index.dtype
    assert split.sent["email"].dtype == whole.sent["email"].dtype


def test_sent_rows_keep_two_columns_of_one_name() -> None:
    rows = pd.DataFrame(
        [["a@x.io", "A"], ["b@x.io", "B"], ["c@x.io", "C"]],
        columns=["email", "email"],
        index=index(["a", "b", "c"]),
    )
    p = plan(rows, index(["b", "d"]), full=True)
    assert list(p.sent.columns) == ["email", "email"]
    assert p.sent.to_numpy().tolist() == [["a@x.io", "A"], ["c@x.io", "C"], ["b@x.io", "B"]]


@pytest.mark.parametrize(
    ("members", "synced", "repeats"),
    [
        (["a", "b", "c"], ["b", "c", "d"], False),
        (["a", "b", "b", "c"], ["b", "c", "d"], True),  # a repeated id the state has
        (["a", "a", "b"], ["b", "c"], True),  # a repeated id that enters
        (["a", "b", "a"], [], True),  # first sync: every id enters
        (["a", "b"], [], False),
        ([], ["a"], False),
    ],
)
def test_repeated_member_ids_are_found(
    members: list[str], synced: list[str], repeats: bool
) -> None:
    # Validation (sources/validate.py) looks for them, so the diff is given unique ids.
    assert has_repeated(index(members)) is repeats


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.text(max_size=3), max_size=12), order=st.sampled_from(["as is", "sorted"]))
def test_has_repeated_matches_a_set(ids: list[str], order: str) -> None:
    """Sorted or not (a strictly increasing list is answered without a hash), any repeat is
    found and no repeat is made up."""
    if order == "sorted":
        ids = sorted(ids, key=lambda u: u.encode())
    assert has_repeated(index(ids)) is (len(set(ids)) < len(ids))


@settings(max_examples=300, deadline=None)
@given(
    members=st.lists(st.sampled_from("abcdefg"), max_size=10),
    synced=st.sets(st.sampled_from("abcdefgh"), max_size=8),
    trait=st.booleans(),
    full=st.booleans(),
    data=st.data(),
)
def test_a_plan_that_checks_repeats_itself_finds_every_one(
    members: list[str], synced: set[str], trait: bool, full: bool, data: st.DataObject
) -> None:
    """``plan(unique=False)``, handed ids that validation did not check, raises
    ``RepeatedIds`` exactly when an id repeats (entering, staying, or with a changed value),
    and otherwise plans what it plans for checked ids."""
    state = sorted(synced)
    values = None
    if trait:  # a computed trait: values from a small set, so repeats agree and disagree
        pick = st.lists(st.sampled_from(["1", "2"]), min_size=len(members), max_size=len(members))
        mine = data.draw(pick)
        theirs = data.draw(
            st.lists(st.sampled_from(["1", "2"]), min_size=len(state), max_size=len(state))
        )
        values = (pa.array(mine, pa.large_string()), pa.array(theirs, pa.large_string()))
    repeats = len(set(members)) < len(members)
    try:
        checked = plan(index(members), index(state), full=full, values=values, unique=False)
    except RepeatedIds:
        assert repeats
        return
    assert not repeats
    given_unique = plan(index(members), index(state), full=full, values=values)
    assert as_lists(checked) == as_lists(given_unique)
    assert checked.changed == given_unique.changed
