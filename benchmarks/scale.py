"""Scale benchmark: whole `audience-sync run`s against DuckDB anchors, in interleaved rounds.

    scripts/with-postgres .venv/bin/python benchmarks/scale.py --sizes 1000000,4000000,20000000

(default: 200,000 memberships, 3 rounds; --cases and --databases pick a subset.)

For each size N it generates seeded data: 8 audiences of N/8 memberships (users overlap across
audiences), as two sets of Parquet snapshots, A and B, where B has 1% of each audience exited
and 1% newly entered. Then, on SQLite and (when AUDIENCE_SYNC_TEST_PG_URL is set) PostgreSQL,
six cases, each as rounds of anchor then measured run (A B A B ...), every one a fresh process:

- initial: an empty state synced to snapshot A. Anchor: the floor, DuckDB writing the same
  JSON lines (one per membership, fsync-ed) and inserting the member rows into a keyed table;
- zero-change: the state synced to A, run on A again. Anchor: reading A's Parquet files with
  pyarrow;
- incremental: 1% entered + 1% exited, alternating A -> B -> A (each round undoes the last, so
  every round starts from the state a previous sync left). Anchor: DuckDB anti-joins both ways
  between the snapshot files and the state as Parquet, materialising the changed ids;
- full: the state synced to A, ``run --full`` on A (every member re-sent). Anchor: the initial
  sync's floor (the issue asks an initial sync and a ``--full`` alike to stay within 2x of it);
- pushdown: the same churn with the audiences as queries of a table in the state database, so
  the diff runs there (``pushdown.py``). Anchor: the same anti-joins;
- trait: one computed trait of N users (a float each) with 1% of the values changed, alternating
  A -> B -> A like incremental. Anchor: a DuckDB full join between the snapshot and the state as
  Parquet comparing the values, materialising the changed ids (issue 11: the same ratio as an
  audience of the same size, the incremental case).

Each round's ratio is measured run / anchor of that round; the table gives the median ratio and
the min-max spread, by wall time and by CPU time (the child's user + system time from wait4; on
a local PostgreSQL plus the server's: its processes' time, read from /proc). Peak RSS is the
measured process's, read by GNU time (/usr/bin/time). The machine's load average is printed at
start and end. Needs the `bench` and `postgres` extras (pip install -e '.[test,bench]').
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

AUDIENCES = 8
CHURN = 0.01
SEED = 20261125
#: audience_sync.messageids.MESSAGE_NAMESPACE, the namespace of the run's message ids.
_MESSAGE_NAMESPACE = "6f1c3a523c1e4bd49a8e5d2b7f0c9e11"
PG_URL_ENV = "AUDIENCE_SYNC_TEST_PG_URL"
CASES = ("initial", "zero-change", "incremental", "full", "pushdown", "trait")
#: Each case's anchor (a mode of this script).
ANCHORS = {
    "initial": "_initial",
    "zero-change": "_read",
    "incremental": "_diff",
    "full": "_initial",
    "pushdown": "_diff",
    "trait": "_values",
}


# -- data ---------------------------------------------------------------------------------------


def _ids(numbers: np.ndarray) -> pa.Array:
    text = pc.cast(pa.array(numbers), pa.string())
    padded = pc.utf8_lpad(text, width=10, padding="0")
    return pc.binary_join_element_wise("u", padded, "")


def generate(folder: Path, n: int) -> None:
    """Snapshots ``snap_{A,B}_{a}.parquet`` and the matching state ``state_{A,B}_{a}.parquet``."""
    rng = np.random.default_rng(SEED + n)
    per = n // AUDIENCES
    churn = int(per * CHURN)
    universe = max(n // 2, per + churn)
    folder.mkdir(parents=True, exist_ok=True)
    for a in range(AUDIENCES):
        before = rng.permutation(universe)[:per]
        entered = universe + a * churn + np.arange(churn)  # users never seen before
        after = rng.permutation(np.concatenate([before[churn:], entered]))
        for name, members in (("A", before), ("B", after)):
            ids = _ids(members)
            emails = pc.binary_join_element_wise(ids, "@example.com", "")
            table = pa.table({"user_id": ids, "email": emails})
            pq.write_table(table, folder / f"snap_{name}_{a}.parquet")
            pq.write_table(
                pa.table({"user_id": _ids(np.sort(members))}), folder / f"state_{name}_{a}.parquet"
            )
    # One computed trait over n users: a value each, 1% of them different in B.
    ids = _ids(np.arange(n))
    values = np.round(rng.uniform(0, 5000, n), 2)
    changed = rng.permutation(n)[: int(n * CHURN)]
    after = values.copy()
    after[changed] += 1.5
    emails = pc.binary_join_element_wise(ids, "@example.com", "")
    for name, column in (("A", values), ("B", after)):
        table = pa.table({"user_id": ids, "email": emails, "value": pa.array(column)})
        pq.write_table(table, folder / f"trait_{name}.parquet")
        pq.write_table(table.select(["user_id", "value"]), folder / f"tstate_{name}.parquet")


def write_config(
    folder: Path, url: str, db: str, snapshot: str, *, pushed: bool, trait: bool = False
) -> Path:
    """The run's config: audiences read from the Parquet snapshots, or (``pushed``) queried from
    the state database's ``bench_snap_*`` table, so the diff is pushed down into it; or
    (``trait``) the one computed trait."""
    lines = [
        "[state]",
        f'url = "{url}"',
        "[destination]",
        'type = "jsonl"',
        f'path = "out_{db}.jsonl"',
    ]
    if trait:
        lines += ["[[computed_traits]]", 'name = "Value"', f'source = "trait_{snapshot}.parquet"']
        path = folder / f"{db}_{snapshot}_trait.toml"
        path.write_text("\n".join(lines) + "\n")
        return path
    for a in range(AUDIENCES):
        lines += ["[[audiences]]", f'name = "Audience {a}"']
        if pushed:
            query = f"select user_id, email from bench_snap_{snapshot} where audience_id = {a}"
            lines += [f'query = "{query}"', f'source_url = "{url}"']
        else:
            lines += [f'source = "snap_{snapshot}_{a}.parquet"']
    path = folder / f"{db}_{snapshot}{'_pushed' if pushed else ''}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_sources(folder: Path, url: str) -> None:
    """Both sets of snapshots as tables ``bench_snap_A`` and ``bench_snap_B`` of the state
    database (audience_id, user_id, email), indexed by audience (not measured)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name in ("A", "B"):
            table = f"bench_snap_{name}"
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(
                sa.text(f"CREATE TABLE {table} (audience_id INT, user_id TEXT, email TEXT)")
            )
            for a in range(AUDIENCES):
                snap = pq.read_table(folder / f"snap_{name}_{a}.parquet")
                if engine.dialect.name == "postgresql":
                    block = io.BytesIO()
                    with_audience = snap.add_column(0, "audience_id", pa.array([a] * snap.num_rows))
                    pacsv.write_csv(with_audience, block, pacsv.WriteOptions(include_header=False))
                    raw: Any = conn.connection.dbapi_connection
                    copy_sql = f"COPY {table} FROM STDIN (FORMAT csv)"
                    with raw.cursor() as cur, cur.copy(copy_sql) as copy:
                        copy.write(block.getvalue())
                else:
                    ids, emails = snap["user_id"].to_pylist(), snap["email"].to_pylist()
                    conn.exec_driver_sql(
                        f"INSERT INTO {table} VALUES (?, ?, ?)",
                        [(a, u, e) for u, e in zip(ids, emails, strict=True)],
                    )
            conn.execute(sa.text(f"CREATE INDEX {table}_audience ON {table} (audience_id)"))
    engine.dispose()
    if engine.dialect.name == "postgresql":
        _vacuum(url)


# -- anchors (each runs in its own process) ------------------------------------------------------


def anchor_initial(folder: Path, snapshot: str) -> dict[str, Any]:
    """The floor of an initial sync: DuckDB writes the identify line the run writes for each
    membership (the same bytes but for the timestamp: traits, context, the uuid5 ``messageId``
    and the tail) and inserts the member rows into a table keyed like ``sync_members``."""
    import duckdb

    database, out = folder / "floor.duckdb", folder / "floor.jsonl"
    for path in (database, out):
        path.unlink(missing_ok=True)
    con = duckdb.connect(str(database))
    con.execute(
        "CREATE TABLE members (audience_id INTEGER, user_id VARCHAR, "
        "PRIMARY KEY (audience_id, user_id))"
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    ending = {"timestamp": stamp, "integrations": {"All": False, "Crisp": True}}
    tail = "," + json.dumps(ending, separators=(",", ":"))[1:]  # after the messageId
    parts = []
    for a in range(AUDIENCES):
        snap, key = folder / f"snap_{snapshot}_{a}.parquet", f"audience_{a}"
        con.execute(f"INSERT INTO members SELECT {a}, user_id FROM '{snap}'")
        personas = {
            "computation_class": "audience",
            "computation_key": key,
            "computation_id": "aud_" + hashlib.sha1(key.encode()).hexdigest()[:24],
            "space_id": "audience-sync",
            "namespace": "spa_audience-sync",
        }
        context = json.dumps({"personas": personas}, separators=(",", ":"))
        # The message id is the run's: uuid5 of "jsonl<US>key<US>user<US>True<US>run", its
        # SHA-1 written 8-4-4-4-12 with the version and variant nibbles set.
        digest = (
            f"sha1(from_hex('{_MESSAGE_NAMESPACE}') || "
            f"encode('jsonl\x1f{key}\x1f' || user_id || '\x1fTrue\x1f{a + 1}'))"
        )
        parts.append(
            f'SELECT concat(\'{{"type":"identify","userId":\', to_json(user_id), '
            f'\',"traits":{{"email":\', to_json(email), \',"{key}":true}},"context":'
            f"{context},\"messageId\":\"', substr(d, 1, 8), '-', substr(d, 9, 4), '-5', "
            "substr(d, 14, 3), '-', substr('89ab89ab89ab89ab', "
            "instr('0123456789abcdef', substr(d, 17, 1)), 1), substr(d, 18, 3), '-', "
            f"substr(d, 21, 12), '\"{tail}') AS line "
            f"FROM (SELECT *, {digest} AS d FROM '{snap}')"
        )
    # One text column written as CSV without quotes, escapes or header (and a delimiter no
    # line holds): each line's bytes as they are, one per row.
    con.execute(
        f"COPY ({' UNION ALL '.join(parts)}) TO '{out}' "
        "(FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\x01')"
    )
    con.close()
    with out.open("rb") as f:
        os.fsync(f.fileno())
    return {"lines": _lines(out)}


def anchor_read(folder: Path, snapshot: str) -> dict[str, Any]:
    """Reading the snapshot files: the least a zero-change run must do."""
    rows = sum(
        pq.read_table(folder / f"snap_{snapshot}_{a}.parquet").num_rows for a in range(AUDIENCES)
    )
    return {"rows": rows}


def anchor_diff(folder: Path, state: str, snapshot: str) -> dict[str, Any]:
    """DuckDB anti-joins both ways between each audience's snapshot and its state as Parquet."""
    import duckdb

    con = duckdb.connect()
    changes = 0
    for a in range(AUDIENCES):
        snap, synced = (
            folder / f"snap_{snapshot}_{a}.parquet",
            folder / f"state_{state}_{a}.parquet",
        )
        for left, right in ((snap, synced), (synced, snap)):
            result = con.sql(
                f"SELECT user_id FROM '{left}' ANTI JOIN '{right}' USING (user_id)"
            ).to_arrow_table()
            changes += result.num_rows
    return {"lines": changes}


def anchor_values(folder: Path, state: str, snapshot: str) -> dict[str, Any]:
    """DuckDB full join between the trait's snapshot and its state as Parquet, comparing values."""
    import duckdb

    snap, synced = folder / f"trait_{snapshot}.parquet", folder / f"tstate_{state}.parquet"
    result = duckdb.connect().sql(
        f"SELECT user_id FROM '{snap}' s FULL JOIN '{synced}' t USING (user_id) "
        "WHERE s.value IS DISTINCT FROM t.value"
    )
    return {"lines": result.to_arrow_table().num_rows}


def _lines(path: Path) -> int:
    count = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
    return count


# -- measuring a process -------------------------------------------------------------------------


def child(argv: list[str], logs: Path, server_cpu: Callable[[], float] | None) -> dict[str, Any]:
    """Run ``argv`` in a fresh process: wall time, CPU time (its own and, given ``server_cpu``,
    the database server's over the same span), peak RSS, and its JSON result (last line)."""
    out_path, err_path = logs / "child.out", logs / "child.err"
    rss_path = logs / "child.rss"
    server0 = server_cpu() if server_cpu else 0.0
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        # Peak RSS through GNU time, not wait4: Linux starts a forked child's peak at its
        # parent's (this script holds the generated data), so wait4 reported the larger of the
        # two; time's own child is forked from a 1 MB process.
        timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path), *argv]
        proc = subprocess.Popen(timed, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: time's rusage and its child's
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if server_cpu:
        time.sleep(0.1)  # the run's backends exit (and are reaped) just after it does
    server = server_cpu() - server0 if server_cpu else 0.0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err_path.read_text()[-3000:]}")
    lines = out_path.read_text().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime + server,
        "server_cpu": server,
        "rss_mb": int(rss_path.read_text().split()[-1]) / 1024,  # %M is in KB
        **result,
    }


def postgres_cpu(url: str) -> Callable[[], float] | None:
    """A reader of the CPU seconds a local PostgreSQL server has used so far (postmaster, its
    live processes and the ones it reaped), or None when its processes cannot be read."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    engine.dispose()
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: int | str) -> list[str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on

    fields = stat(backend)
    if fields is None:
        return None
    postmaster = int(fields[1])

    def used() -> float:
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            f = stat(entry)
            if f is None:
                continue
            if int(entry) == postmaster:  # utime, stime, and its reaped children's
                total += sum(int(x) for x in f[11:15])
            elif int(f[1]) == postmaster:
                total += int(f[11]) + int(f[12])
        return total / tick

    return used


# -- the rounds ----------------------------------------------------------------------------------


def run_size(
    n: int,
    root: Path,
    databases: list[tuple[str, str]],
    cases: list[str],
    rounds: int,
    baseline: Path | None = None,
) -> list[dict[str, Any]]:
    folder = root / f"n{n}"
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    generate(folder, n)
    _log(f"[{n:,}] data generated in {time.perf_counter() - t:.1f}s")
    me = [sys.executable, __file__]
    cli = str(Path(sys.executable).parent / "audience-sync")
    # Another build's command (--baseline), measured in the same rounds against the same anchor.
    clis = [("run", cli)] + ([("baseline", str(baseline))] if baseline else [])
    rows: list[dict[str, Any]] = []
    for db, url in databases:
        server_cpu = postgres_cpu(url) if db == "postgresql" else None
        if db == "postgresql" and server_cpu is None:
            _log("PostgreSQL's processes are not readable here: its CPU time is left out")
        out = folder / f"out_{db}.jsonl"

        def sync(
            snapshot: str, pushed: bool = False, url: str = url, db: str = db, trait: bool = False
        ) -> list[str]:
            config = write_config(folder, url, db, snapshot, pushed=pushed, trait=trait)
            return [cli, "run", "--config", str(config)]

        synced = "A"  # the snapshots the state was last synced to
        for case in CASES:
            if case not in cases:
                continue
            if case != "initial" and not any(row["db"] == db for row in rows):
                _reset(url)  # the other cases start from an initial sync to A
                child(sync("A"), folder, None)
                synced = "A"
            if case == "pushdown":
                load_sources(folder, url)
            if case == "trait":  # the trait's own initial sync to A (not measured)
                child(sync("A", trait=True), folder, None)
                synced = "A"
            pairs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
            for r in range(rounds):
                a: dict[str, Any] | None = None
                # The measured builds take turns going first, so drift favours neither.
                order = clis if r % 2 == 0 else clis[::-1]
                for label, program in order:
                    # Initial: from an empty state to A. Zero-change: the synced snapshots
                    # again. Incremental and pushdown: A -> B, B -> A, ... (1% entered + 1%
                    # exited each).
                    then = {"initial": "A", "zero-change": synced, "full": synced}.get(
                        case, "B" if synced == "A" else "A"
                    )
                    run_argv = sync(then, case == "pushdown", trait=case == "trait")
                    run_argv[0] = program
                    if case == "full":  # every member re-sent, none added
                        run_argv.append("--full")
                    if case == "initial":
                        _reset(url)
                    elif db == "postgresql":  # as autovacuum would leave it between runs
                        _vacuum(url)
                    out.unlink(missing_ok=True)
                    if a is None:  # one anchor per round, before the first measured run
                        anchor_argv = [*me, ANCHORS[case], str(folder)]
                        # The floor and the read take the snapshot; the joins both sides.
                        one_side = ANCHORS[case] in ("_initial", "_read")
                        anchor_argv += [then] if one_side else [synced, then]
                        a = child(anchor_argv, folder, None)
                    b = child(run_argv, folder, server_cpu)
                    b["lines"] = _lines(out) if out.exists() else 0
                    pairs.setdefault(label, []).append((a, b))
                    synced = then
                    _log(
                        f"[{n:,}] {case} on {db}, round {r + 1}, {label}: anchor "
                        f"{a['wall']:.2f} s ({a['cpu']:.2f} s CPU), run {b['wall']:.2f} s "
                        f"({b['cpu']:.2f} s CPU, {b['server_cpu']:.2f} of it the server's), "
                        f"{b['rss_mb']:.0f} MB, {b['lines']:,} lines; "
                        f"load {os.getloadavg()[0]:.2f}"
                    )
            for label, _ in clis:
                name = case if label == "run" else f"{case} ({label})"
                rows.append({"n": n, "case": name, "db": db, "pairs": pairs[label]})
    shutil.rmtree(folder)
    return rows


def _reset(url: str) -> None:
    """An empty state at the current schema (not measured)."""
    from audience_sync.state import connect, upgrade

    if url.startswith("sqlite"):
        database = Path(sa.make_url(url).database or "")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
    else:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
    engine = connect(url)
    upgrade(engine)
    engine.dispose()


def _vacuum(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    engine.dispose()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the table ----------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| memberships | case | state | rounds | anchor s (median) | run s (median) "
        "| x anchor, wall: median (min-max) | x anchor, CPU: median (min-max) "
        "| run peak RSS MB (max) | lines written |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        anchors = [a for a, _ in row["pairs"]]
        runs = [b for _, b in row["pairs"]]
        wall = [b["wall"] / a["wall"] for a, b in row["pairs"]]
        cpu = [b["cpu"] / a["cpu"] for a, b in row["pairs"]]
        lines = sorted({b["lines"] for b in runs})
        print(
            f"| {row['n']:,} | {row['case']} | {row['db']} | {len(runs)} "
            f"| {statistics.median(a['wall'] for a in anchors):.2f} "
            f"| {statistics.median(b['wall'] for b in runs):.2f} "
            f"| {_spread(wall)} | {_spread(cpu)} "
            f"| {max(b['rss_mb'] for b in runs):,.0f} | {', '.join(f'{x:,}' for x in lines)} |"
        )


def main() -> None:
    anchors: dict[str, Callable[..., dict[str, Any]]] = {
        "_initial": anchor_initial,
        "_read": anchor_read,
        "_diff": anchor_diff,
        "_values": anchor_values,
    }
    if len(sys.argv) > 1 and sys.argv[1] in anchors:
        print(json.dumps(anchors[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000", help="memberships, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="anchor/run pairs per case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/audience-sync-bench"))
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another build's audience-sync command (e.g. an older checkout's "
        ".venv/bin/audience-sync), run in every round beside this one; same schema only",
    )
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}")
    databases = []
    for db in args.databases.split(","):
        if db == "sqlite":
            databases.append((db, f"sqlite:///{args.workdir / 'state.db'}"))
        elif db == "postgresql" and os.environ.get(PG_URL_ENV):
            databases.append((db, os.environ[PG_URL_ENV]))
        elif db == "postgresql":
            _log(f"{PG_URL_ENV} not set: PostgreSQL skipped (use scripts/with-postgres)")
        else:
            parser.error(f"unknown database {db!r}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", end="")
    print(f" ({os.cpu_count()} CPUs)")
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(n, args.workdir, databases, cases, args.rounds, args.baseline)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print_table(rows)


if __name__ == "__main__":
    main()
