"""A fault-injecting destination for engine tests: records every update it is given and
answers per user as told (deliver, fail, skip), or stops the run part-way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from audience_sync.destinations.base import Destination, DestinationSettings
from audience_sync.errors import AudienceSyncError
from audience_sync.model import ChangeBatch, Outcome, UserUpdate


class RecordingSettings(DestinationSettings):
    pass


class RecordingDestination(Destination):
    kind = "recording"
    settings_model = RecordingSettings

    def __init__(
        self,
        name: str = "recording",
        *,
        fail: Iterable[str] = (),
        permanent: Iterable[str] = (),
        skip: Iterable[str] = (),
        stop_after: int | None = None,
        stop_with: BaseException | None = None,
        batch: int = 2,
    ) -> None:
        super().__init__(RecordingSettings(), name=name, config_dir=Path("."))
        self.fail = set(fail)
        self.permanent = set(permanent)
        self.skip = set(skip)
        self.stop_after = stop_after
        self.stop_with = stop_with or AudienceSyncError("stopped on purpose")
        self.batch = batch
        self.updates: list[UserUpdate] = []
        self.delivered: list[UserUpdate] = []

    def outcome(self, update: UserUpdate) -> Outcome:
        user = update.user_id
        if user in self.permanent:
            return Outcome.failed(
                user, "invalid_data: email rejected", retryable=False, status_code=400
            )
        if user in self.fail:
            return Outcome.failed(user, "server_error", status_code=503)
        if user in self.skip:
            return Outcome.skipped(user, "email required to create a profile")
        self.delivered.append(update)
        return Outcome.delivered(user)

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncIterator[list[Outcome]]:
        pending: list[Outcome] = []
        for update in updates:
            if self.stop_after is not None and len(self.updates) >= self.stop_after:
                if pending:
                    yield pending
                raise self.stop_with
            self.updates.append(update)
            pending.append(self.outcome(update))
            if len(pending) >= self.batch:
                yield pending
                pending = []
        if pending:
            yield pending

    def sent(self) -> dict[str, dict[str, bool]]:
        """user_id -> traits, over all delivered updates (later ones win)."""
        result: dict[str, dict[str, bool]] = {}
        for update in self.delivered:
            result.setdefault(update.user_id, {}).update(update.traits)
        return result


class BatchRecordingDestination(Destination):
    """A destination that takes ``ChangeBatch``es: records each, confirms it whole, or stops
    the run after ``stop_after`` batches."""

    kind = "batch_recording"
    settings_model = RecordingSettings
    takes_batches = True

    def __init__(
        self,
        name: str = "recording",
        *,
        users: int = 2,
        stop_after: int | None = None,
        stop_with: BaseException | None = None,
    ) -> None:
        super().__init__(RecordingSettings(), name=name, config_dir=Path())
        self.users = users
        self.stop_after = stop_after
        self.stop_with = stop_with or AudienceSyncError("stopped on purpose")
        self.batches: list[ChangeBatch] = []

    @property
    def batch_users(self) -> int:
        return self.users

    async def deliver_batches(self, batches: Iterable[ChangeBatch]) -> AsyncIterator[ChangeBatch]:
        for batch in batches:
            if self.stop_after is not None and len(self.batches) >= self.stop_after:
                raise self.stop_with
            self.batches.append(batch)
            yield batch

    def sent(self) -> list[tuple[str, str, bool]]:
        """(user_id, audience_key, value) of every change confirmed, in order."""
        return [
            (u.user_id, c.audience_key, c.value)
            for b in self.batches
            for u in b.updates()
            for c in u.changes
        ]
