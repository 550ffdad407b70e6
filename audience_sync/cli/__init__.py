"""The ``audience-sync`` command: parses arguments, calls the library, prints results.

A front end over the library (docs/architecture.md): this module holds the root group, the
logging set-up, ``serve`` and the entry point ``main``; the commands are in ``runs`` (``run``,
``retire``), ``admin`` (``init``, ``check``, ``key``, ``db``, ``track``), ``history`` and
``views`` (``status``, ``report``, ``ui``), with what they share in ``shared``.

Errors are ``AudienceSyncError`` subclasses, each with its exit code (see ``errors.py``);
tracebacks only with ``--verbose``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from pathlib import Path

# Before NumPy loads: OpenBLAS starts a thread per core that spins after a BLAS call. The
# runs' NumPy work is elementwise, and those threads took the cores DuckDB and SQLite work on:
# 1M-membership initial syncs used 0.3 s (4%) more CPU with them. A user's own setting stays.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Before pyarrow loads: its allocator (mimalloc) holds on to the pages of freed Arrow data, so
# each audience planned left 300-400 MB behind at 20M memberships. Given back at once, a 20M
# incremental run peaked at 726 MB instead of 921 (an initial sync at 620 instead of 777), for
# 2-7% more CPU (docs/scale.md); a serve process no longer keeps them between runs either.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
# And no transparent huge pages for the process (mimalloc applies it with
# PR_SET_THP_DISABLE): it asked for them on its arena, so every fault zeroed 2 MB, and with the
# pages given back at once each audience's buffers faulted all of them anew. A 20M incremental
# run spent 2 s of its 14 s of CPU zeroing them (docs/scale.md).
os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")

import click

from audience_sync.cli import admin, history, runs, views
from audience_sync.cli.shared import config_option, err
from audience_sync.errors import AudienceSyncError, ExitCode
from audience_sync.logs import TEXT_FORMAT, JsonFormatter


def _limit_malloc_arenas(arenas: int) -> None:
    """Have glibc's malloc share ``arenas`` arenas among all threads, unless the user set
    ``MALLOC_ARENA_MAX`` (or its tunable) themselves."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    if "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return
    mallopt(-8, arenas)  # M_ARENA_MAX; a C library without it ignores the call


# Before any thread starts (nothing imported above starts one): at most two malloc arenas
# (glibc's default: 8 per core). Each audience's state is read on threads that live for that
# audience (the member cache's file, or ADBC's two halves at once), and each new thread took an
# arena of its own, where what it had allocated stayed once freed: without the member cache a
# 4M-membership run grew by 30 MB an audience (520 MB at the last of 8 instead of 340), and
# the cap costs no CPU (docs/scale.md).
_limit_malloc_arenas(2)

# Commands import the engine, the state and the history in their bodies: SQLAlchemy, pandas,
# pyarrow and DuckDB load only for the commands that use them (`--help` and `key` need none).


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    """Structured ``key=value`` (or JSON) log lines on stderr; only warnings when a person is
    watching."""
    level = logging.DEBUG if verbose else (logging.WARNING if err.is_terminal else logging.INFO)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=TEXT_FORMAT,
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        force=True,
    )
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and full tracebacks.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr as key=value text or one JSON object per line.",
)
@click.version_option(package_name="audience-sync")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, log_format: str) -> None:
    """Keep Crisp (or a JSONL file) in step with your audience snapshots."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose, log_format)


@cli.command()
@config_option
def serve(config_path: Path) -> None:
    """Run every audience on its schedule until SIGTERM/SIGINT (SIGHUP reloads the config)."""
    from audience_sync.service import Service

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)  # a service logs its runs
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    sys.exit(Service(config_path).run())


for _command in (
    runs.run,
    runs.retire_command,
    admin.track_command,
    admin.key,
    admin.check_command,
    admin.init_command,
    admin.db,
    history.history,
    views.status,
    views.report_command,
    views.ui_command,
):
    cli.add_command(_command)


def main() -> None:
    """Entry point: map errors to exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AudienceSyncError as exc:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            traceback.print_exc()  # and still the documented exit code
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)


def console_main() -> None:
    """The ``audience-sync`` console script: ``main``, then the process ends without the
    interpreter's teardown.

    Tearing the interpreter down after a run (freeing every module and object that pandas,
    pyarrow, SQLAlchemy and DuckDB loaded, and a last garbage collection) cost 0.18 s of CPU
    after an incremental run of 4M memberships, 5% of the run. By the time ``main`` returns,
    what the command wrote is committed and closed and its threads have ended; the output
    streams and the log handlers are flushed here. If another thread is still running, or
    the exit status is not a number, the interpreter exits the usual way instead (which
    waits for the thread). ``main`` itself returns normally, for callers in Python.
    """
    try:
        main()
    except SystemExit as exc:
        status = exc.code
    else:
        status = 0
    if status is None:
        status = 0
    if not isinstance(status, int) or threading.active_count() > 1:
        sys.exit(status)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe, say: the interpreter reports it as it always does
        sys.exit(status)
    os._exit(status)
