"""The process's scratch DuckDB: each cursor sees only its own registered tables."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from audience_sync.scratch import scratch


def test_threads_querying_at_once_see_only_their_own_tables() -> None:
    results: dict[int, list[int]] = {}
    start = threading.Barrier(4)

    def work(n: int) -> None:
        with scratch() as con:
            con.register("t", pa.table({"x": list(range(n, n + 1000))}))
            start.wait()  # all four registered under the same name before any query runs
            sums = []
            for _ in range(20):
                sums.append(int(con.sql("SELECT sum(x) AS s FROM t").fetchnumpy()["s"][0]))
            results[n] = sums

    # Daemons: threads stuck in a broken scratch must not keep the test run from ending.
    threads = [threading.Thread(target=work, args=(n * 10_000,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {n: set(sums) for n, sums in results.items()} == {
        n * 10_000: {sum(range(n * 10_000, n * 10_000 + 1000))} for n in range(4)
    }


def test_a_closed_cursor_takes_its_tables_with_it() -> None:
    with scratch() as con:
        con.register("leftover", pa.table({"x": [1]}))
    with scratch() as con, pytest.raises(Exception, match="leftover"):
        con.sql("SELECT * FROM leftover").fetchnumpy()
