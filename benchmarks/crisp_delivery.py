"""Crisp delivery benchmark: requests per changed user and achieved request rate.

Runs the real ``sync`` (state in SQLite) against the loopback Crisp server (tests/crisp_server.py)
with a per-request latency and a server-side rate limit, for a first sync of N new users and an
incremental sync in which all N users change (half leave audience A, half enter audience B),
without and with ``batch = true``; then a first sync of N users whose profiles already exist in
Crisp (made by the chat widget), with and without a ``name`` in the snapshot, against a server
that accepts an email in place of a people_id and one that does not. Prints, per case: requests,
requests per changed user, 429 answers, wall time, achieved requests/s and that rate as a
fraction of the server's limit. The pre-existing cases run under a daily budget of 10 requests
per user, so a request loop shows up as a spent budget instead of running for hours.

    .venv/bin/python benchmarks/crisp_delivery.py                       # 5,000 users, ~7 minutes
    .venv/bin/python benchmarks/crisp_delivery.py --users 500 --json out.json

Only 127.0.0.1 is used. The client's ``requests_per_second`` defaults to the server's limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crisp_server import CrispServer

from audience_sync import load_config, sync

WEBSITE, IDENTIFIER, KEY = "bench-website", "bench-identifier", "bench-key"


def write_snapshot(path: Path, ids: range, *, name: bool = False) -> None:
    if name:
        rows = [f"user{i:07},User{i:07}@example.com,User {i}" for i in ids]
        lines = ["user_id,email,name", *rows]
    else:
        lines = ["user_id,email", *(f"user{i:07},user{i:07}@example.com" for i in ids)]
    path.write_text("\n".join(lines) + "\n")


def write_config(
    folder: Path,
    server: CrispServer,
    args: argparse.Namespace,
    batch: bool,
    budget: int = 1_000_000,
) -> Path:
    path = folder / "audience-sync.toml"
    path.write_text(
        f"""[state]
url = "sqlite:///{folder / "state.db"}"

[destination]
type = "crisp"
website_id = "{WEBSITE}"
api_url = "{server.url}"
max_concurrency = {args.concurrency}
requests_per_second = {args.rps or args.limit}
daily_request_budget = {budget}
batch = {"true" if batch else "false"}
batch_size = {args.batch_size}
batch_linger = 1.0

[[audiences]]
name = "Audience A"
source = "a.csv"

[[audiences]]
name = "Audience B"
source = "b.csv"
"""
    )
    return path


def measure(server: CrispServer, config: Path, changed: int) -> dict[str, Any]:
    server.reset_counts()
    started = time.perf_counter()
    try:
        result = sync(load_config(config))
        outcome = "ok" if result.exit_code == 0 else f"exit {result.exit_code}"
        if result.exit_code:
            errors = {r.error for r in result.audiences if r.error}
            print(f"  exit {result.exit_code}: {'; '.join(sorted(errors))[:300]}", flush=True)
    except RecursionError:
        outcome = "RecursionError"
    wall = time.perf_counter() - started
    requests = server.count()
    limited = sum(1 for r in server.requests if r.status in (420, 429))
    rate = requests / wall
    return {
        "outcome": outcome,
        "changed_users": changed,
        "requests": requests,
        "requests_per_user": requests / changed,
        "rate_limited": limited,
        "seconds": wall,
        "requests_per_second": rate,
        "fraction_of_limit": rate / server.rate_limit_per_second
        if server.rate_limit_per_second
        else None,
    }


def serve(args: argparse.Namespace, **options: Any) -> CrispServer:
    """The loopback server with the benchmark's latency and rate limit."""
    return CrispServer(
        website_id=WEBSITE,
        identifier=IDENTIFIER,
        key=KEY,
        latency=args.latency,
        rate_limit_per_second=args.limit,
        **options,
    )


def run_case(args: argparse.Namespace, batch: bool) -> list[dict[str, Any]]:
    n = args.users
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="crisp-bench-") as tmp,
        serve(args, batch_max=max(args.batch_size, 100)) as server,
    ):
        folder = Path(tmp)
        config = write_config(folder, server, args, batch)
        write_snapshot(folder / "a.csv", range(n))
        write_snapshot(folder / "b.csv", range(0))
        rows.append({"case": "first sync", "batch": batch, **measure(server, config, n)})
        # incremental: the first half leave A, the second half enter B
        write_snapshot(folder / "a.csv", range(n // 2, n))
        write_snapshot(folder / "b.csv", range(n // 2, n))
        rows.append({"case": "incremental", "batch": batch, **measure(server, config, n)})
        assert len(server.profiles) == n
    return rows


def run_existing(args: argparse.Namespace, email_id: bool, name: bool) -> dict[str, Any]:
    """A first sync of users whose profiles the chat widget made (mixed-case emails)."""
    n = args.users
    with (
        tempfile.TemporaryDirectory(prefix="crisp-bench-") as tmp,
        serve(args, email_as_people_id=email_id) as server,
    ):
        folder = Path(tmp)
        for i in range(n):
            server.add_profile(f"user{i:07}@example.com", person={"nickname": "Visitor"})
        config = write_config(folder, server, args, batch=False, budget=10 * n)
        write_snapshot(folder / "a.csv", range(n), name=name)
        write_snapshot(folder / "b.csv", range(0))
        addressing = "email id" if email_id else "no email id"
        case = f"existing, {addressing}, {'name' if name else 'no name'}"
        row = {"case": case, "batch": False, **measure(server, config, n)}
        row["duplicates"] = len(server.profiles) - n
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    parser.add_argument("--limit", type=int, default=50, help="server requests per second")
    parser.add_argument("--rps", type=float, default=None, help="client ceiling (default: limit)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.update({"CRISP_IDENTIFIER": IDENTIFIER, "CRISP_KEY": KEY})
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{args.users:,} changed users; server: {args.latency * 1000:.0f} ms latency, "
        f"{args.limit} requests/s limit; client: {args.concurrency} concurrent, "
        f"{args.rps or args.limit} requests/s ceiling"
    )
    results = run_case(args, batch=False) + run_case(args, batch=True)
    for email_id in (True, False):
        for name in (False, True):
            results.append(run_existing(args, email_id, name))
    header = (
        f"{'case':<32} {'batch':<5} {'requests':>9} {'req/user':>9} {'429s':>6} "
        f"{'seconds':>8} {'req/s':>7} {'of limit':>9}  outcome"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['case']:<32} {str(r['batch']).lower():<5} {r['requests']:>9,} "
            f"{r['requests_per_user']:>9.3f} {r['rate_limited']:>6} {r['seconds']:>8.1f} "
            f"{r['requests_per_second']:>7.1f} {r['fraction_of_limit']:>9.2f}  {r['outcome']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
