"""SQL source benchmark: the streamed read (``read_query``) against the old whole-result read.

    scripts/with-postgres .venv/bin/python benchmarks/sql_source.py

(default: 1,000,000 rows, 3 rounds, SQLite and, when AUDIENCE_SYNC_TEST_PG_URL is set,
PostgreSQL; --rows, --rounds and --databases change that.)

A table of N rows (``user_id`` text, ``email`` text) is written once per database; then, in
rounds of old then new (interleaved, every read a fresh process), the audience's query
``SELECT user_id, email FROM bench_source`` is read into the frame validation takes. Old is
``pd.read_sql_query`` of the whole result (``reference`` in tests/sources/test_sql_stream.py,
which asserts the two give the same snapshots); new is ``audience_sync.sources.sql.read_query``
(on PostgreSQL through ADBC; ``chunks`` is its read without ADBC, as databases without an Arrow
path are read).
Reported: median wall time and peak RSS of the reading process (from wait4), and the RSS of a
process that only imported the same modules, for scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
QUERY = "SELECT user_id, email FROM bench_source"


def _reference() -> object:
    path = REPO / "tests" / "sources" / "test_sql_stream.py"
    spec = importlib.util.spec_from_file_location("test_sql_stream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference


def child(mode: str, url: str) -> None:
    """One measured read (run in a fresh process)."""
    from audience_sync.sources import sql
    from audience_sync.sources.sql import read_query

    reference = _reference()
    if mode == "imports":
        return
    if mode == "chunks":  # the read of databases without an Arrow path (ADBC) on this one
        sql._read_adbc = lambda *_: None  # type: ignore[assignment]
    start = time.perf_counter()
    frame = reference(url, QUERY) if mode == "old" else read_query(url, QUERY)  # type: ignore[operator]
    elapsed = time.perf_counter() - start
    assert str(frame["user_id"].dtype) == "string", frame.dtypes
    print(f"{elapsed:.3f} {len(frame)}")


def fill(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    numbers = (
        f"SELECT i FROM generate_series(1, {rows}) AS i"
        if engine.dialect.name == "postgresql"
        else f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}) "
        "SELECT i FROM s"
    )
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS bench_source"))
        conn.execute(sa.text("CREATE TABLE bench_source (user_id TEXT, email TEXT)"))
        conn.execute(
            sa.text(
                "INSERT INTO bench_source SELECT 'user-' || i, 'user' || i || '@example.com' "
                f"FROM ({numbers}) AS n"
            )
        )
    engine.dispose()


def measure(mode: str, url: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one read in a fresh process."""
    argv = [sys.executable, __file__, "--child", mode, url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} read failed ({status})")
    seconds = float(out.split()[0]) if out.strip() else 0.0
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/source.db"}
        if os.environ.get("AUDIENCE_SYNC_TEST_PG_URL"):
            urls["postgresql"] = os.environ["AUDIENCE_SYNC_TEST_PG_URL"]
        print(f"| database | read | wall s (median of {args.rounds}) | peak RSS MB (median) |")
        print("|---|---|---:|---:|")
        for name in args.databases.split(","):
            if name not in urls:
                print(f"skipping {name}: set AUDIENCE_SYNC_TEST_PG_URL (scripts/with-postgres)")
                continue
            url = urls[name]
            fill(url, args.rows)
            modes = ["old", "new"] if name == "sqlite" else ["old", "chunks", "new"]
            results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    results[mode].append(measure(mode, url))
            _, imports = measure("imports", url)
            for mode, runs in results.items():
                wall = statistics.median(s for s, _ in runs)
                rss = statistics.median(r for _, r in runs)
                spread = ", ".join(f"{s:.2f} s / {r:.0f} MB" for s, r in runs)
                print(f"| {name} | {mode} | {wall:.2f} | {rss:.0f} | ({spread})")
            print(f"| {name} | imports only | | {imports:.0f} |")
    print(f"load average at end: {os.getloadavg()}; rows: {args.rows:,}")


if __name__ == "__main__":
    main()
