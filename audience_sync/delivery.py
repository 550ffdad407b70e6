"""Delivery: the run's changes handed to the destination, each confirmation recorded behind it.

The stage between *changes* and *record* (see docs/architecture.md). The engine builds the
run's ``RunChanges`` and a ``Delivery``; ``Delivery.run`` hands the changes to the destination
in the shape it takes (per-user ``UserUpdate``s or whole ``ChangeBatch``es), gives each
confirmation to the outcome ledger (``state/ledger.py``) and commits it in a worker thread while
the destination sends the next batch. Beside it run a heartbeat that keeps the run's leases
alive and a watchdog that, once a stop is asked for, gives in-flight requests
``stop_timeout`` before cancelling them. However delivery ends, what was confirmed is committed
before ``run`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from audience_sync.changes import RunChanges
from audience_sync.destinations import Destination
from audience_sync.errors import (
    AudienceSyncError,
    CredentialsError,
    DestinationError,
    QuotaExhausted,
    StateError,
)
from audience_sync.model import ChangeBatch, RunStatus, UserUpdate
from audience_sync.progress import Progress
from audience_sync.state.ledger import Ledger

__all__ = ["COMMITS_IN_FLIGHT", "UPDATE_BATCH", "Delivery", "Ended"]

log = logging.getLogger("audience_sync")

#: Commits running at once for a batch destination on PostgreSQL (SQLite takes one writer at
#: a time): each is a few bulk statements one server process works through on one core.
COMMITS_IN_FLIGHT = 2
#: Users per batch of changes prepared for a destination that takes updates one user at a time.
UPDATE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Ended:
    """How delivery ended: ``status`` None when it ran to the end (each audience's own
    counters then say whether it succeeded); else the status every audience of the run ends
    with, the message, and the error type when it failed."""

    status: RunStatus | None = None
    error: str | None = None
    error_type: type[AudienceSyncError] | None = None


@dataclass(slots=True)
class Delivery:
    """One run's delivery: the destination, the ledger its confirmations go to, and the leases
    to keep alive (``renew`` renews them, inside a commit's transaction when given one)."""

    destination: Destination
    ledger: Ledger
    renew: Callable[[sa.Connection | None], None]
    should_stop: Callable[[], bool]
    #: How long in-flight requests get after a stop, and how often the leases are renewed.
    stop_timeout: float
    heartbeat_every: float
    #: Commits at once: see ``_commit_behind``.
    commits_in_flight: int = 1
    progress: Progress | None = None
    #: Users confirmed so far.
    done: int = 0

    def commit(self) -> None:
        """Commit what the ledger recorded so far, in this thread."""
        self._commit(self.ledger.take())

    def _commit(self, batches: list[Any]) -> None:
        self.ledger.commit(batches, on_commit=self.renew)

    async def _commit_async(self) -> None:
        """Commit what was recorded so far in a worker thread, off the event loop."""
        batches = self.ledger.take()
        if batches:
            await asyncio.to_thread(self._commit, batches)

    async def _commit_behind(self, running: list[asyncio.Task[None]]) -> None:
        """Commit the outcomes recorded so far in the background, beside earlier commits (for
        a destination that takes batches).

        So the destination delivers the next batch while the database commits this one, and a
        batch destination on PostgreSQL has up to ``COMMITS_IN_FLIGHT`` commits at once, on
        connections of their own (batches never share a user, so they may commit in any order;
        their counter updates queue on the run rows' locks, always taken in the same order). A
        run killed at any moment re-sends at most the batches being committed and the one being
        delivered, never what a finished commit recorded. A failed commit raises here.
        """
        if len(running) >= self.commits_in_flight:
            await running.pop(0)
        running.append(asyncio.create_task(self._commit_async()))
        # One turn of the loop starts the commit even for a destination that never awaits.
        await asyncio.sleep(0)

    async def run(self, changes: RunChanges) -> Ended:
        """Send every change in ``changes``; how delivery ended."""
        started = time.perf_counter()
        total = changes.users
        heartbeat = asyncio.create_task(self._heartbeat())
        watchdog = asyncio.create_task(self._stop_watchdog(asyncio.current_task()))
        committing: list[asyncio.Task[None]] = []
        if self.progress is not None:
            self.progress("delivering", None, 0, total)
        try:
            if total:
                async with (
                    self.destination as dest,
                    contextlib.aclosing(self._confirmed(dest, changes)) as confirmations,
                ):
                    async for users in confirmations:
                        self.done += users
                        if dest.takes_batches:
                            await self._commit_behind(committing)
                        else:
                            # A per-user destination starts its next users once we come back
                            # for more (Crisp holds a permit per user until then), so what it
                            # confirmed is committed first: a kill then re-sends at most its
                            # in-flight calls, however slow the database is.
                            await self._commit_async()
                        if self.progress is not None:
                            self.progress("delivering", None, self.done, total)
        except QuotaExhausted as exc:
            message = exc.describe(max(total - self.done, 0))
            log.warning("destination=%s %s", self.destination.name, message)
            return Ended(RunStatus.PARTIAL, message)
        except CredentialsError as exc:
            return Ended(RunStatus.FAILED, str(exc), CredentialsError)
        except DestinationError as exc:
            return Ended(RunStatus.FAILED, str(exc), DestinationError)
        except (asyncio.CancelledError, KeyboardInterrupt):
            return Ended(RunStatus.INTERRUPTED, "stopped by a signal before the run finished")
        finally:
            heartbeat.cancel()
            watchdog.cancel()
            failed_commit: BaseException | None = None
            if committing:
                await asyncio.wait(committing)  # their threads finish whatever happens
                failures = [t.exception() for t in committing if not t.cancelled()]
                failed_commit = next((e for e in failures if e is not None), None)
            self.commit()  # whatever was confirmed is recorded, however delivery ended
            if total or changes.held_users:
                held = changes.held_users
                log.info(
                    "destination=%s confirmed %d of %d users in %.2fs%s",
                    self.destination.name,
                    self.done,
                    total,
                    time.perf_counter() - started,
                    f"; {held} held after a permanent failure (--retry-failed)" if held else "",
                )
            if failed_commit is not None:
                raise failed_commit
        if self.should_stop():
            return Ended(RunStatus.INTERRUPTED, "stopped by a signal before the run finished")
        return Ended()

    async def _confirmed(self, dest: Destination, changes: RunChanges) -> AsyncGenerator[int, None]:
        """Hand ``changes`` to ``dest`` in the shape it takes; record each confirmation as it
        comes and yield how many users it settled."""
        if dest.takes_batches:
            batches = self._batches(changes, dest.batch_users)
            async with contextlib.aclosing(dest.deliver_batches(batches)) as stream:
                async for confirmed in stream:
                    self.ledger.record_batch(confirmed)
                    yield confirmed.users
            return
        inflight: dict[str, UserUpdate] = {}

        def feed() -> Iterator[UserUpdate]:
            for batch in self._batches(changes, UPDATE_BATCH):
                for update in batch.updates():
                    if self.should_stop():
                        return
                    inflight[update.user_id] = update
                    yield update

        async with contextlib.aclosing(dest.deliver(feed())) as outcomes_stream:
            async for outcomes in outcomes_stream:
                for outcome in outcomes:
                    self.ledger.record(inflight.pop(outcome.user_id), outcome)
                yield len(outcomes)

    def _batches(self, changes: RunChanges, users: int) -> Iterator[ChangeBatch]:
        """The changes in batches of ``users`` users, until a stop is asked for."""
        for batch in changes.batches(users):
            if self.should_stop():
                return
            yield batch

    async def _stop_watchdog(self, delivery: asyncio.Task[Any] | None) -> None:
        """Once a stop is asked for, give in-flight requests ``stop_timeout``, then cancel them."""
        while not self.should_stop():
            await asyncio.sleep(0.05)
        self.destination.stop()  # queued users stay pending; in-flight requests finish
        await asyncio.sleep(self.stop_timeout)
        log.warning(
            "in-flight deliveries still running %.0fs after the stop; cancelling", self.stop_timeout
        )
        if delivery is not None:
            delivery.cancel()

    async def _heartbeat(self) -> None:
        """Renew the run's leases every ``heartbeat_every`` seconds while delivery runs."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                await asyncio.to_thread(self.renew, None)
            except StateError as exc:
                # The next commit renews inside its transaction and stops the run on this.
                log.error("lock heartbeat: %s", exc)
                return
