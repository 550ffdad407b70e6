"""`audience-sync init`: a starter project from templates inside the wheel, that runs as is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, cli

from audience_sync.starter import STARTER_FILES


def test_init_then_run_there_syncs_the_sample_audience(tmp_path: Path) -> None:
    project = tmp_path / "project"
    done = cli("init", str(project))
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()) == (
        sorted(STARTER_FILES.values())
    )
    checked = cli("check", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ran = cli("run", "--json", cwd=project)  # the default --config, from the project folder
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = json.loads(ran.stdout)
    assert [(a["key"], a["delivered"]) for a in result["audiences"]] == [
        ("newsletter_subscribers", 3)
    ]
    lines = (project / "out" / "identify.jsonl").read_text().splitlines()
    assert {json.loads(line)["userId"] for line in lines} == {"u001", "u002", "u003"}
    ignored = (project / ".gitignore").read_text().split()
    assert "*.db" in ignored and "out/" in ignored


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    config = tmp_path / "config" / "audience-sync.toml"
    config.parent.mkdir()
    config.write_text("# mine\n")
    refused = cli("init", str(tmp_path))
    assert refused.returncode == 2
    assert "--force" in refused.stderr and str(config) in refused.stderr
    assert config.read_text() == "# mine\n"
    assert not (tmp_path / ".gitignore").exists()  # nothing written, not even the other files
    forced = cli("init", str(tmp_path), "--force")
    assert forced.returncode == 0 and "[state]" in config.read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_templates_are_inside_the_wheel(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ next to the sources it is given.
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=540,
    )
    (wheel,) = tmp_path.glob("audience_sync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in STARTER_FILES:
        assert f"audience_sync/templates/{template}" in names
