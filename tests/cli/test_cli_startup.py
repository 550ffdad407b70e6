"""`--help`, `key`, `status` and `history` start without the run machinery: no pandas, pyarrow
or DuckDB (and `--help`/`key` no SQLAlchemy); a `run` with nothing changed loads no more than it
uses. Checked in a fresh interpreter by the modules it loaded, not by a timing
(benchmarks/cli_startup.py measures the time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RSS_MB_SOURCE, needs_proc_rss, query, write_config, write_csv

HEAVY = ("pandas", "pyarrow", "duckdb", "numpy")

# Runs the CLI's entry point in-process, then prints which of the modules asked about it loaded.
_WRAPPER = """
import json, sys
watched = json.loads(sys.argv[1])
sys.argv = ["audience-sync", *sys.argv[2:]]
from audience_sync.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"loaded": [m for m in watched if m in sys.modules], "code": code}))
"""


def loaded_by(*args: str, watched: tuple[str, ...], cwd: Path | None = None) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, json.dumps(watched), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["code"] in (0, None), proc.stderr
    loaded: list[str] = result["loaded"]
    return loaded


@pytest.mark.parametrize("args", [["--help"], ["key", "High Value Customers"], ["run", "--help"]])
def test_help_and_key_load_neither_the_data_stack_nor_sqlalchemy(args: list[str]) -> None:
    assert loaded_by(*args, watched=(*HEAVY, "sqlalchemy", "alembic", "httpx")) == []


def synced_once(tmp_path: Path) -> Path:
    """The config of one scheduled audience from a CSV file, synced once to a JSONL file (its
    SQLite state is ``state.db`` beside it)."""
    write_csv(tmp_path / "vip.csv", "user_id,email\nu1,a@x.io\n")
    config = write_config(
        tmp_path / "c.toml",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        audiences=[{"name": "VIP", "source": "vip.csv", "schedule": "0 * * * *"}],
    )
    subprocess.run(
        [str(Path(sys.executable).parent / "audience-sync"), "run", "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return config


def test_status_and_history_load_no_data_stack(tmp_path: Path) -> None:
    config = synced_once(tmp_path)
    for args in (["status"], ["history"], ["history", "1"], ["history", "--failed"]):
        assert loaded_by(*args, "--config", str(config), watched=HEAVY) == [], args


#: What a run whose snapshots are all unchanged must not load: the Crisp client and the
#: webhook's HTTP (httpx, tenacity), `serve`'s scheduler (the config checks a cron `schedule`
#: with APScheduler's trigger) and metrics, the web UI's templates, Alembic (the schema is
#: checked by its stamped revision), DuckDB (nothing is diffed) and the progress bar (not on
#: a terminal).
NOT_FOR_A_SKIPPED_RUN = (
    "httpx",
    "tenacity",
    "apscheduler.schedulers",
    "prometheus_client",
    "jinja2",
    "alembic",
    "mako",
    "duckdb",
    "audience_sync.destinations.crisp",
    "audience_sync.service",
    "audience_sync.web",
    "audience_sync.history",
    "rich.progress",
)


def test_a_run_with_nothing_changed_loads_no_sender_scheduler_ui_or_migrations(
    tmp_path: Path,
) -> None:
    config = synced_once(tmp_path)
    loaded = loaded_by("run", "--config", str(config), watched=NOT_FOR_A_SKIPPED_RUN)
    last = "SELECT unchanged_since FROM sync_runs ORDER BY id DESC LIMIT 1"
    skipped = query(f"sqlite:///{tmp_path / 'state.db'}", last)
    assert skipped == [{"unchanged_since": 1}]  # the run measured is the skipping one
    assert loaded == []


def test_the_lazy_public_api_still_resolves_every_name() -> None:
    code = (
        "import sys, audience_sync as a; assert 'pandas' not in sys.modules; "
        "[getattr(a, n) for n in a.__all__]; print(a.sync.__module__, a.track.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["audience_sync.engine", "audience_sync.track"]


@pytest.mark.parametrize(
    ("variable", "given", "expected"),
    [
        ("OPENBLAS_NUM_THREADS", None, "1"),
        ("OPENBLAS_NUM_THREADS", "3", "3"),
        ("MIMALLOC_PURGE_DELAY", None, "0"),
        ("MIMALLOC_PURGE_DELAY", "250", "250"),
        ("MIMALLOC_ALLOW_THP", None, "0"),
        ("MIMALLOC_ALLOW_THP", "1", "1"),
    ],
)
def test_the_cli_sets_native_libraries_up_before_they_load_unless_told(
    variable: str, given: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenBLAS reads its thread count as NumPy loads, and pyarrow's allocator its purge delay
    as pyarrow loads: the CLI must set them first (idle BLAS threads spin on the cores a run
    needs; freed Arrow pages held back cost 300-400 MB at 20M), and leave a user's own setting
    alone."""
    if given is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, given)
    script = (
        "import os, sys, json; import audience_sync.cli; "
        "print(json.dumps(['numpy' in sys.modules or 'pyarrow' in sys.modules, "
        f"os.environ.get({variable!r})]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, expected]


def _reports_thp() -> bool:
    status = Path("/proc/self/status")
    return status.exists() and "THP_enabled:" in status.read_text()


@pytest.mark.skipif(not _reports_thp(), reason="needs Linux's THP_enabled in /proc/self/status")
@pytest.mark.parametrize(("given", "expected"), [(None, "0"), ("1", "1")])
def test_a_cli_process_has_no_transparent_huge_pages_once_arrow_allocates(
    given: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What MIMALLOC_ALLOW_THP=0 is for: Arrow's allocator turns huge pages off for the whole
    process (a fault no longer zeroes 2 MB); a user's own setting keeps them."""
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)  # pyarrow's own: mimalloc
    if given is None:
        monkeypatch.delenv("MIMALLOC_ALLOW_THP", raising=False)
    else:
        monkeypatch.setenv("MIMALLOC_ALLOW_THP", given)
    script = (
        "import audience_sync.cli, pyarrow as pa; column = pa.array(range(1_000_000)); "
        "print([line for line in open('/proc/self/status') if line.startswith('THP_enabled:')]"
        "[0].split()[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.split()[-1] == expected


@needs_proc_rss
def test_arrow_memory_freed_in_a_cli_process_goes_back_to_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the purge delay is for: Arrow columns a step freed (a planned audience's snapshot)
    no longer count in the process's memory. mimalloc's own default held all ~600 MB here."""
    monkeypatch.delenv("MIMALLOC_PURGE_DELAY", raising=False)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)  # pyarrow's own: mimalloc
    script = (
        RSS_MB_SOURCE
        + """
import audience_sync.cli
import pyarrow as pa, pyarrow.compute as pc
start = rss_mb()
ids = pc.cast(pa.array(range(3_000_000)), pa.string())
columns = [pc.binary_join_element_wise(ids, "@example.com", "") for _ in range(8)]
peak = rss_mb()
del ids, columns
print(round(start), round(peak), round(rss_mb()))
"""
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    start, peak, after = map(int, proc.stdout.split())
    assert peak - start > 400  # the columns were resident
    assert after - start < (peak - start) / 4, (start, peak, after)


# The console script's entry point, with a marker file written by an exit handler: the
# interpreter's teardown runs those handlers, so the marker says whether it ran.
_CONSOLE = """
import atexit, sys, threading, time
from pathlib import Path
marker, linger = Path(sys.argv[1]), float(sys.argv[2])
atexit.register(marker.write_text, "torn down")
def work() -> None:
    time.sleep(linger)
    Path(str(marker) + ".thread").touch()
if linger:  # a thread still at work when the command returns
    threading.Thread(target=work).start()
sys.argv = ["audience-sync", *sys.argv[3:]]
from audience_sync.cli import console_main
console_main()
"""


def console(tmp_path: Path, *args: str, linger: float = 0) -> subprocess.CompletedProcess[str]:
    marker = tmp_path / "marker"
    marker.unlink(missing_ok=True)
    return subprocess.run(
        [sys.executable, "-c", _CONSOLE, str(marker), str(linger), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_console_script_ends_a_run_without_teardown_and_loses_no_output(
    tmp_path: Path,
) -> None:
    """The teardown of a process that loaded pandas, pyarrow and DuckDB cost 0.18 s of CPU
    after a 4M-membership run; it is skipped, but what the run printed and logged (to pipes,
    which buffer) is all there."""
    config = synced_once(tmp_path)
    write_csv(tmp_path / "vip.csv", "user_id,email\nu1,a@x.io\nu2,b@x.io\n")  # u2 enters
    proc = console(tmp_path, "run", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole document, flushed
    assert [(a["entered"], a["exited"]) for a in result["audiences"]] == [(1, 0)]
    assert "status=succeeded" in proc.stderr.splitlines()[-1]  # the last log line too
    assert not (tmp_path / "marker").exists()  # no teardown


def test_the_console_script_keeps_a_failed_commands_exit_code(tmp_path: Path) -> None:
    proc = console(tmp_path, "run", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 3  # ExitCode.CONFIG
    assert "missing.toml" in proc.stderr
    assert not (tmp_path / "marker").exists()


def test_the_console_script_waits_for_a_thread_still_at_work(tmp_path: Path) -> None:
    """With another thread alive it exits the usual way: the thread finishes first."""
    proc = console(tmp_path, "key", "High Value Customers", linger=1.0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "high_value_customers"
    assert (tmp_path / "marker.thread").exists()
    assert (tmp_path / "marker").read_text() == "torn down"


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


# Eight threads alive at once, each having allocated; glibc then prints one block per arena.
_ARENAS = """
import sys, threading, ctypes
if sys.argv[1] == "cli":
    import audience_sync.cli
barrier = threading.Barrier(9)
kept = []
def work():
    kept.append(bytearray(1 << 20))
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
barrier.wait()
ctypes.CDLL(None).malloc_stats()
barrier.wait()
"""


@pytest.mark.skipif(not _glibc(), reason="malloc arenas are glibc's")
@pytest.mark.parametrize(
    ("imported", "arena_max", "arenas"),
    [("cli", None, "2"), ("cli", "4", "4"), ("nothing", None, "more than 2")],
)
def test_a_cli_process_shares_two_malloc_arenas_among_its_threads(
    imported: str, arena_max: str | None, arenas: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads that read one audience's state each took a malloc arena of their own, and kept
    what they had allocated there: 30 MB more per audience of 500,000 without the member
    cache. The CLI caps the arenas at two (a user's MALLOC_ARENA_MAX stays); a plain Python
    process gives each of the eight threads its own."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if arena_max is None:
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    else:
        monkeypatch.setenv("MALLOC_ARENA_MAX", arena_max)
    proc = subprocess.run(
        [sys.executable, "-c", _ARENAS, imported],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = sum(line.startswith("Arena ") for line in proc.stderr.splitlines())
    # Without the cap: one per thread up to 8 per core (a single core's 8 is still more than 2).
    assert found > 2 if arenas == "more than 2" else found == int(arenas)
