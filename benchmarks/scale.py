"""Scale benchmark: audience-sync's diff and whole run against a DuckDB anti-join anchor.

    scripts/with-postgres .venv/bin/python benchmarks/scale.py [--sizes 1000000,5000000,20000000]

For each size N it generates seeded data (8 audiences of N/8 memberships as Parquet snapshots,
a prior state with 1% of each audience since exited and 1% newly entered), loads the prior state
into SQLite and (when AUDIENCE_SYNC_TEST_PG_URL is set) PostgreSQL, then measures, each in a
fresh process: (1) the anchor, DuckDB anti-joins between the snapshot and state Parquet files;
(2) audience-sync's diff split into read snapshot / read state / diff / write state changes;
(3) the whole `audience-sync run` on the jsonl destination. Prints wall seconds, rows/s, peak
RSS and the ratios to the anchor. Needs the `bench` extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

AUDIENCES = 8
CHURN = 0.01
SEED = 20261125
PG_URL_ENV = "AUDIENCE_SYNC_TEST_PG_URL"


# -- data ---------------------------------------------------------------------------------------


def _ids(numbers: np.ndarray) -> pa.Array:
    text = pc.cast(pa.array(numbers), pa.string())
    padded = pc.utf8_lpad(text, width=10, padding="0")
    return pc.binary_join_element_wise("u", padded, "")


def generate(folder: Path, n: int) -> None:
    """Snapshot and prior-state Parquet files per audience; users overlap across audiences."""
    rng = np.random.default_rng(SEED + n)
    per = n // AUDIENCES
    churn = int(per * CHURN)
    universe = max(n // 2, per + churn)
    folder.mkdir(parents=True, exist_ok=True)
    for a in range(AUDIENCES):
        prior = rng.permutation(universe)[:per]
        entered = universe + a * churn + np.arange(churn)  # users never seen before
        now = rng.permutation(np.concatenate([prior[churn:], entered]))
        ids = _ids(now)
        emails = pc.binary_join_element_wise(ids, "@example.com", "")
        pq.write_table(pa.table({"user_id": ids, "email": emails}), folder / f"snap_{a}.parquet")
        pq.write_table(pa.table({"user_id": _ids(np.sort(prior))}), folder / f"state_{a}.parquet")


def load_state(folder: Path, url: str) -> None:
    """The prior state, as a previous successful sync left it (bulk-loaded, not measured)."""
    from audience_sync.model import RunStatus
    from audience_sync.state import StateStore, connect, upgrade

    engine = connect(url)
    upgrade(engine)
    store = StateStore(engine)
    ids = []
    for a in range(AUDIENCES):
        ref = store.audience("jsonl", f"audience_{a}", f"Audience {a}")
        run = store.start_run(ref, mode="initial", trigger="manual")
        store.finish_run(run, RunStatus.SUCCEEDED)
        ids.append(ref.id)
    engine.dispose()
    if url.startswith("sqlite"):
        con = sqlite3.connect(sa.make_url(url).database or "")
        con.execute("PRAGMA synchronous = OFF")
        for a, audience_id in enumerate(ids):
            users = pq.read_table(folder / f"state_{a}.parquet")["user_id"].to_pylist()
            con.executemany(
                "INSERT INTO sync_members (audience_id, user_id) VALUES (?, ?)",
                ((audience_id, u) for u in users),
            )
        con.commit()
        con.close()
        return
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        raw: Any = conn.connection.dbapi_connection
        for a, audience_id in enumerate(ids):
            users = pq.read_table(folder / f"state_{a}.parquet")["user_id"].to_pylist()
            block = "".join(f"{audience_id}\t{u}\n" for u in users).encode()
            with raw.cursor() as cur, cur.copy("COPY sync_members FROM STDIN") as copy:
                for start in range(0, len(block), 1 << 24):
                    copy.write(block[start : start + (1 << 24)])
    engine.dispose()
    _vacuum(url)


def write_config(folder: Path, url: str, name: str) -> Path:
    lines = [
        "[state]",
        f'url = "{url}"',
        "[destination]",
        'type = "jsonl"',
        f'path = "out_{name}.jsonl"',
    ]
    for a in range(AUDIENCES):
        lines += ["[[audiences]]", f'name = "Audience {a}"', f'source = "snap_{a}.parquet"']
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- measurements (each runs in its own process) -------------------------------------------------


def measure_anchor(folder: Path) -> dict[str, float]:
    import duckdb

    con = duckdb.connect()
    changes = 0
    for a in range(AUDIENCES):
        snap, state = folder / f"snap_{a}.parquet", folder / f"state_{a}.parquet"
        for left, right in ((snap, state), (state, snap)):
            result = con.sql(
                f"SELECT user_id FROM '{left}' ANTI JOIN '{right}' USING (user_id)"
            ).to_arrow_table()
            changes += result.num_rows
    return {"changes": changes}


def measure_diff(folder: Path, url: str) -> dict[str, float]:
    from audience_sync.config import AudienceConfig
    from audience_sync.diff import members_repeat, plan
    from audience_sync.sources import load_snapshot
    from audience_sync.state import StateStore, connect
    from audience_sync.state.bulk import add_members, remove_members

    engine = connect(url)
    store = StateStore(engine)
    stages = dict.fromkeys(("read snapshot", "read state", "diff", "write changes"), 0.0)
    changes = 0
    for a in range(AUDIENCES):
        ref = store.find_audience("jsonl", f"audience_{a}")
        assert ref is not None
        t0 = time.perf_counter()
        # As the engine does it (planning.load_and_plan, less its overlap of the two reads):
        # repeated ids are looked for by the diff.
        audience = AudienceConfig(name="x", source=folder / f"snap_{a}.parquet")
        snapshot = load_snapshot(audience, check_repeats=False)
        t1 = time.perf_counter()
        synced = store.members(ref.id)
        t2 = time.perf_counter()
        the_plan = plan(snapshot.members.index, synced)
        assert not members_repeat(snapshot.members.index, synced, the_plan)
        t3 = time.perf_counter()
        conn = engine.connect()
        with conn.begin() as tx:  # measured, then rolled back: the next measurement needs it
            add_members(conn, [(ref.id, u) for u in the_plan.entered])
            remove_members(conn, [(ref.id, u) for u in the_plan.exited])
            t4 = time.perf_counter()
            tx.rollback()
        conn.close()
        changes += the_plan.sends
        for stage, took in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[stage] += took
        del snapshot, synced, the_plan
    engine.dispose()
    return {"changes": changes, **stages}


def child(argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` in a fresh process; its wall time, peak RSS and JSON result."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode()[-3000:]}")
    lines = out.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, **result}


# -- the table ----------------------------------------------------------------------------------


def run_size(n: int, root: Path, pg_url: str | None) -> list[dict[str, Any]]:
    folder = root / f"n{n}"
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    generate(folder, n)
    print(f"[{n:,}] data generated in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    me = [sys.executable, __file__]
    rows: list[dict[str, Any]] = []
    anchor = child([*me, "_anchor", str(folder)])
    rows.append({"n": n, "what": "anchor: DuckDB anti-joins (Parquet)", **anchor})
    databases = [("sqlite", f"sqlite:///{folder / 'state.db'}")]
    if pg_url:
        databases.append(("postgresql", pg_url))
    for name, url in databases:
        if name == "postgresql":
            _reset_postgres(url)
        t = time.perf_counter()
        load_state(folder, url)
        print(f"[{n:,}] {name} state loaded in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        split = child([*me, "_diff", str(folder), url])
        rows.append({"n": n, "what": f"diff, state in {name}", **split})
        if name == "postgresql":
            # The diff measurement's rolled-back writes leave dead rows behind; vacuum them so
            # the whole run starts from the state as a previous sync (and autovacuum) left it.
            _vacuum(url)
        for stage in ("read snapshot", "read state", "diff", "write changes"):
            rows.append({"n": n, "what": f"  {stage}", "wall": split[stage], "rss_mb": None})
        config = write_config(folder, url, name)
        cli = str(Path(sys.executable).parent / "audience-sync")
        whole = child([cli, "run", "--config", str(config)])
        rows.append({"n": n, "what": f"whole run, {name} + jsonl", **whole})
    for row in rows:
        row["ratio"] = row["wall"] / anchor["wall"]
    shutil.rmtree(folder)
    return rows


def _vacuum(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE sync_members"))
    engine.dispose()


def _reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"| {'N':>10} | {'measurement':<38} | {'wall s':>7} | {'rows/s':>10} | "
        f"{'peak RSS MB':>11} | {'x anchor':>8} |"
    )
    print(f"|{'-' * 12}|{'-' * 40}|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 10}|")
    for r in rows:
        rate = f"{r['n'] / r['wall']:,.0f}" if r["rss_mb"] is not None else ""
        rss = f"{r['rss_mb']:,.0f}" if r["rss_mb"] is not None else ""
        print(
            f"| {r['n']:>10,} | {r['what']:<38} | {r['wall']:>7.2f} | {rate:>10} | "
            f"{rss:>11} | {r['ratio']:>8.2f} |"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_anchor":
        print(json.dumps(measure_anchor(Path(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_diff":
        print(json.dumps(measure_diff(Path(sys.argv[2]), sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000,20000000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/audience-sync-bench"))
    args = parser.parse_args()
    pg_url = os.environ.get(PG_URL_ENV)
    if not pg_url:
        print(
            f"{PG_URL_ENV} not set: PostgreSQL rows skipped (use scripts/with-postgres)",
            file=sys.stderr,
        )
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(n, args.workdir, pg_url)
    print_table(rows)


if __name__ == "__main__":
    main()
