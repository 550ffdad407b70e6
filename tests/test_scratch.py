"""The process's scratch DuckDB: each cursor sees only its own registered tables."""

from __future__ import annotations

import subprocess
import sys
import threading

import pyarrow as pa
import pytest
from conftest import RSS_MB_SOURCE, needs_proc_rss

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


_DIFF_THEN_WAIT = (
    RSS_MB_SOURCE
    + """
import sys, time
import numpy as np, pandas as pd, pyarrow as pa
from audience_sync.diff import plan

def ids(numbers):
    text = pa.array([f"u{n:010d}" for n in numbers])
    return pd.Index(text.to_pandas(types_mapper=pd.ArrowDtype)).astype("string[pyarrow]")

n = 1_500_000
members, synced = ids(range(n)), ids(range(n // 100, n + n // 100))
before = rss_mb()
plan(members, synced)
after = rss_mb()
for _ in range(240):  # up to a minute: the allocator hands pages back in the background
    if rss_mb() - before < 60:
        break
    time.sleep(0.25)
print(round(after - before), round(rss_mb() - before))
"""
)


@needs_proc_rss
def test_memory_a_diff_used_goes_back_to_the_system() -> None:
    # A process keeps the scratch database for its life (a service, for days): what a big
    # diff's hash table used must not stay with it.
    done = subprocess.run(
        [sys.executable, "-c", _DIFF_THEN_WAIT], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    during, left = (int(x) for x in done.stdout.split())
    assert during >= 60, f"the diff should have used memory to give back ({during} MB)"
    assert left < 60, f"{left} MB of the diff's memory still held a minute later"
