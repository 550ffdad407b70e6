"""A run killed with SIGKILL keeps its lease; on the same host its lock is taken over at once.
Also: a state database this version cannot migrate is a clear ``StateError``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from audience_sync.errors import StateError
from audience_sync.state import RunLock, StateStore, connect, upgrade
from audience_sync.state.lock import holder_is_dead


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process any more
    return proc.pid


def test_holder_is_dead() -> None:
    here = socket.gethostname()
    assert holder_is_dead(f"{here}:{_dead_pid()}")
    assert not holder_is_dead(f"{here}:{os.getpid()}")
    assert not holder_is_dead(f"another-host:{_dead_pid()}")  # never judged from here
    assert not holder_is_dead("garbage")


def test_lock_of_a_dead_local_process_is_taken_over(state_url: str) -> None:
    engine = connect(state_url)
    upgrade(engine)
    store = StateStore(engine)
    ref = store.audience("crisp:w", "vip", "VIP")
    lock = RunLock(engine)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    first = lock.acquire(ref, dead)
    run_id = store.start_run(ref, mode="initial", trigger="manual")
    lock.attach_run(first, run_id)
    lease = lock.acquire(ref, f"{socket.gethostname()}:{os.getpid()}")  # no 60 s wait
    assert lease.taken_over_run == run_id
    engine.dispose()


def test_a_database_from_another_version_is_a_clear_state_error(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(StateError, match="another version of audience-sync"):
        upgrade(engine)
    engine.dispose()
