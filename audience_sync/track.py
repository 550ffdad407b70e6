"""Send Segment-spec Track (and Identify) calls to the destination, outside an audience sync.

``read_calls`` parses a file of Segment messages, one JSON object per line; ``track`` sends them
and returns one outcome per call. A Track for a user the destination does not know (Crisp: no
profile yet) is dropped, counted and reported with the reason, as the Segment destination does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audience_sync.config import Config
from audience_sync.destinations import Call, Destination, IdentifyCall, TrackEvent
from audience_sync.engine import open_destination
from audience_sync.errors import SnapshotError, StateError
from audience_sync.model import DeliveryStatus, Outcome
from audience_sync.result import PARTIAL_EXIT_CODE
from audience_sync.state import connect, schema_is_current, upgrade

__all__ = ["CallResult", "read_calls", "track"]

log = logging.getLogger("audience_sync")


@dataclass(frozen=True, slots=True)
class CallResult:
    """The outcome of each call, in the order given."""

    destination: str
    calls: tuple[Call, ...]
    outcomes: tuple[Outcome, ...]

    def count(self, status: DeliveryStatus) -> int:
        return sum(o.status is status for o in self.outcomes)

    @property
    def counts(self) -> dict[str, int]:
        return {s.value: self.count(s) for s in DeliveryStatus}

    @property
    def reasons(self) -> Counter[str]:
        """How many calls were not delivered, per reason."""
        return Counter(o.reason or o.status.value for o in self.outcomes if o.reason)

    @property
    def exit_code(self) -> int:
        delivered = self.count(DeliveryStatus.DELIVERED)
        return 0 if delivered == len(self.outcomes) else PARTIAL_EXIT_CODE


def _call(message: Any, where: str) -> Call:
    if not isinstance(message, dict):
        raise SnapshotError(f"{where}: expected a JSON object (a Segment message)")
    kind = message.get("type")
    user_id = message.get("userId")
    if kind not in ("track", "identify"):
        raise SnapshotError(f"{where}: `type` is {kind!r}; only 'track' and 'identify' are sent")
    if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
        raise SnapshotError(f"{where}: `userId` is missing (anonymous calls cannot reach Crisp)")
    if not isinstance(user_id, str | int) or isinstance(user_id, bool):
        raise SnapshotError(f"{where}: `userId` must be a string")
    user = str(user_id).strip()
    if kind == "identify":
        traits = message.get("traits", {})
        if not isinstance(traits, dict):
            raise SnapshotError(f"{where}: `traits` must be an object")
        return IdentifyCall(user_id=user, traits=traits)
    event = message.get("event")
    if not isinstance(event, str) or not event.strip():
        raise SnapshotError(f"{where}: a track message needs a non-empty `event`")
    properties = message.get("properties", {})
    if not isinstance(properties, dict):
        raise SnapshotError(f"{where}: `properties` must be an object")
    context = message.get("context") or {}
    traits = context.get("traits") if isinstance(context, dict) else None
    email = traits.get("email") if isinstance(traits, dict) else None
    return TrackEvent(
        user_id=user,
        event=event.strip(),
        properties=properties,
        email=email if isinstance(email, str) else None,
    )


def read_calls(path: Path) -> list[Call]:
    """The Track/Identify messages of a JSONL file; an error names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: cannot read: {exc}") from None
    calls = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SnapshotError(f"{where}: not valid JSON ({exc.msg})") from None
        calls.append(_call(message, where))
    return calls


def track(
    config: Config, calls: Sequence[Call], *, destination: Destination | None = None
) -> CallResult:
    """Send ``calls`` to the configured destination; one outcome per call, in order."""
    engine = connect(config.state.url)
    try:
        dest = destination or open_destination(config, engine)
        dest.preflight()
        if config.state.auto_migrate:
            upgrade(engine)
        elif not schema_is_current(engine):
            raise StateError("the state database needs `audience-sync db upgrade` first")

        async def send() -> list[Outcome]:
            async with dest:
                return await dest.send_calls(calls)

        outcomes = asyncio.run(send()) if calls else []
        result = CallResult(dest.name, tuple(calls), tuple(outcomes))
        log.info(
            "track destination=%s calls=%d %s",
            dest.name,
            len(calls),
            " ".join(f"{k}={v}" for k, v in result.counts.items()),
        )
        return result
    finally:
        engine.dispose()
