"""A destination that needs no credentials: Segment-spec Identify messages, one JSON per line.

Each audience change becomes one Identify (as Engage sends them), appended to a file and
``fsync``-ed before its outcomes are confirmed, so the state never runs ahead of the file.
Useful for trying audience-sync out, and as a hand-off to any tool that reads Segment messages.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

import orjson

from audience_sync.destinations.base import Call, Destination, DestinationSettings, IdentifyCall
from audience_sync.errors import DestinationError
from audience_sync.model import Change, Outcome, UserUpdate

__all__ = ["JsonlDestination", "JsonlSettings", "identify_message"]


class JsonlSettings(DestinationSettings):
    path: Path = Path("out/identify.jsonl")
    """Output file, relative to the config file's folder; appended to."""
    space_id: str = "audience-sync"
    """Written as ``context.personas.space_id`` (Segment's Engage space)."""
    flush_every: int = 5000
    """Users written between two ``fsync`` calls (each confirms that many users).

    Each confirmed block is one state commit: 5,000 (~2 MB of JSON) keeps both the fsyncs and
    the commits off the critical path at 400,000 changes (docs/scale.md); a crash re-writes at
    most two blocks."""
    fsync: bool = True


@functools.cache
def computation_id(audience_key: str) -> str:
    """A stable id for the audience in ``context.personas`` (Segment uses ``aud_...`` ids)."""
    return "aud_" + hashlib.sha1(audience_key.encode()).hexdigest()[:24]


def identify_message(
    update: UserUpdate, change: Change, *, space_id: str, timestamp: str
) -> dict[str, Any]:
    """The Segment Identify that Engage would send for one audience change.

    The ``context`` and ``integrations`` parts are shared between messages (read-only).
    """
    return {
        "type": "identify",
        "userId": update.user_id,
        "traits": {**update.identity.traits(), change.audience_key: change.value},
        "context": _context(change.audience_key, space_id),
        "messageId": change.message_id,
        "timestamp": timestamp,
        "integrations": _INTEGRATIONS,
    }


_INTEGRATIONS: dict[str, bool] = {"All": False, "Crisp": True}


@functools.cache
def _context(audience_key: str, space_id: str) -> dict[str, Any]:
    # The same for every message of an audience: built once, not 100,000s of times. Plain
    # dicts (orjson serialises no read-only mapping type), so nothing may modify them.
    personas = {
        "computation_class": "audience",
        "computation_key": audience_key,
        "computation_id": computation_id(audience_key),
        "space_id": space_id,
        "namespace": f"spa_{space_id}",
    }
    return {"personas": personas}


def encode_line(message: dict[str, Any]) -> bytes:
    # orjson: about 8x the standard library's encoder, which matters at 100,000s of messages.
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def _drop_torn_line(path: Path) -> None:
    """Cut a partial last line left by a process killed mid-write.

    Its user was never confirmed (confirmation follows the fsync), so the next run re-sends it.
    """
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline; keep everything up to it.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


class JsonlDestination(Destination):
    kind = "jsonl"
    settings_model = JsonlSettings
    settings: JsonlSettings
    _file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        path = self.settings.path
        return path if path.is_absolute() else self.config_dir / path

    async def __aenter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_line(self.path)
            self._file = self.path.open("ab")
        except OSError as exc:
            raise DestinationError(f"cannot open {self.path} for writing: {exc.strerror}") from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _durable(self) -> None:
        """Flush to the OS and to disk: a confirmed outcome must survive a crash."""
        assert self._file is not None
        self._file.flush()
        if self.settings.fsync:
            os.fsync(self._file.fileno())

    def _write(self, lines: list[bytes]) -> None:
        assert self._file is not None, "use the destination as an async context manager"
        try:
            self._file.writelines(lines)
            self._durable()
        except OSError as exc:
            raise DestinationError(f"cannot write to {self.path}: {exc.strerror}") from None

    async def pace(self, n: int) -> None:
        """Called before the ``n``-th user (from 0) when a subclass overrides it (tests slow
        delivery down this way); the plain destination skips the call on its hot path."""

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncGenerator[list[Outcome], None]:
        timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        lines: list[bytes] = []
        confirmed: list[Outcome] = []
        paced = type(self).pace is not JsonlDestination.pace
        for n, update in enumerate(updates):
            if paced:
                await self.pace(n)
            for change in update.changes:
                message = identify_message(
                    update, change, space_id=self.settings.space_id, timestamp=timestamp
                )
                lines.append(encode_line(message))
            confirmed.append(Outcome.delivered(update.user_id))
            if len(confirmed) >= self.settings.flush_every:
                self._write(lines)
                yield confirmed
                lines, confirmed = [], []
        if confirmed:
            self._write(lines)
            yield confirmed

    async def send_calls(self, calls: Sequence[Call]) -> list[Outcome]:
        timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        lines, outcomes = [], []
        for call in calls:
            message: dict[str, Any]
            if isinstance(call, IdentifyCall):
                message = {"type": "identify", "userId": call.user_id, "traits": call.traits}
            else:
                message = {
                    "type": "track",
                    "userId": call.user_id,
                    "event": call.event,
                    "properties": call.properties,
                }
                if call.email is not None:
                    message["context"] = {"traits": {"email": call.email}}
            message |= {
                "messageId": str(uuid.uuid4()),
                "timestamp": timestamp,
                "integrations": {"All": False, "Crisp": True},
            }
            lines.append(encode_line(message))
            outcomes.append(Outcome.delivered(call.user_id))
        self._write(lines)
        return outcomes
