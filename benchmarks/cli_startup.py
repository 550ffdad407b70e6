"""CLI start-up benchmark: wall time of `audience-sync --help` (and `key`, `import audience_sync`)
for a baseline git ref against the working tree, in interleaved A/B rounds, median reported.

    .venv/bin/python benchmarks/cli_startup.py                  # baseline: main, 15 rounds

The baseline's source is taken with `git archive` into a temporary folder and put first on
PYTHONPATH, so both sides run with the same interpreter and installed libraries; rounds
alternate which side goes first so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "--help": "import sys; sys.argv = ['audience-sync', '--help']\n"
    "from audience_sync.cli import main\ntry: main()\nexcept SystemExit: pass",
    "key": "import sys; sys.argv = ['audience-sync', 'key', 'High Value Customers']\n"
    "from audience_sync.cli import main\ntry: main()\nexcept SystemExit: pass",
    "import audience_sync": "import audience_sync",
}


def export(ref: str, into: Path) -> Path:
    """The ref's source tree, extracted into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def seconds(code: str, tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git ref to compare against")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"baseline": export(args.baseline, Path(tmp)), "this tree": REPO}
        print(f"{'command':<22} {'baseline (s)':>13} {'this tree (s)':>14} {'ratio':>6}")
        for name, code in COMMANDS.items():
            times: dict[str, list[float]] = {side: [] for side in sides}
            for side in sides:  # warm the page cache and .pyc files on both sides first
                seconds(code, sides[side])
            for i in range(args.rounds):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))
                for side in order:
                    times[side].append(seconds(code, sides[side]))
            a, b = (statistics.median(times[s]) for s in sides)
            print(f"{name:<22} {a:>13.3f} {b:>14.3f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
