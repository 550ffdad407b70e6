"""The README's examples work as written (issue 13.11)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli

README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_the_python_api_snippet_runs_from_the_repository_root(tmp_path: Path) -> None:
    """`python -c` in the repository's root puts its audience_sync/ folder ahead of the
    installed package; the snippet must still find the migrations (a state database exists,
    so the dry run checks its schema version)."""
    [snippet] = re.findall(r"```python\n(.*?)```", section("Using it from Python"), re.S)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert cli("db", "upgrade", "--url", url).returncode == 0
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=REPO,
        env={"AUDIENCE_SYNC_STATE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "high_value_customers succeeded {'snapshot_rows': 3, 'rejected_rows': 0, 'entered': 3, "
        "'exited': 0, 'unchanged': 0, 'pending': 3}",
        "0",
    ]


def test_the_walk_through_leaves_tracked_files_alone() -> None:
    """Every file the walk-throughs copy lands in the git-ignored scratch/ folder."""
    copies = re.findall(r"^\$ .*\bcp (.*)$", README, re.M)
    assert len(copies) >= 4
    for command in copies:
        for step in command.split("&&"):
            target = step.split()[-1]
            assert target.startswith("scratch/"), command
    assert "scratch/" in (REPO / ".gitignore").read_text().splitlines()
