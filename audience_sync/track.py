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
from audience_sync.errors import ExitCode, SnapshotError
from audience_sync.model import DeliveryStatus, Outcome
from audience_sync.planning import SAMPLE_SIZE
from audience_sync.runtime import ready, resources

__all__ = ["CallFile", "CallResult", "SkippedLine", "read_calls", "sends_here", "track"]

log = logging.getLogger("audience_sync")

#: This destination's name in a Segment message's Integrations object.
INTEGRATION = "Crisp"


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A line of a calls file that is not a call audience-sync can send, and why."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class CallFile:
    """The calls of a file, the lines skipped as unusable, and how many calls the messages'
    Integrations objects turned off for this destination (``"Crisp": false``...)."""

    calls: list[Call]
    skipped: tuple[SkippedLine, ...] = ()
    integrations_off: int = 0


@dataclass(frozen=True, slots=True)
class CallResult:
    """The outcome of each call, in the order given, and what was left out before sending."""

    destination: str
    calls: tuple[Call, ...]
    outcomes: tuple[Outcome, ...]
    skipped_lines: tuple[SkippedLine, ...] = ()
    integrations_off: int = 0

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
    def exit_code(self) -> ExitCode:
        """``PARTIAL`` when a call was not delivered or a line was skipped (a turned-off call is
        fine)."""
        delivered = self.count(DeliveryStatus.DELIVERED)
        complete = delivered == len(self.outcomes) and not self.skipped_lines
        return ExitCode.OK if complete else ExitCode.PARTIAL


class _BadLine(ValueError):
    """A line that is not a call audience-sync can send; the message says why."""


def _call(message: Any) -> Call:
    if not isinstance(message, dict):
        raise _BadLine("expected a JSON object (a Segment message)")
    kind = message.get("type")
    user_id = message.get("userId")
    if kind not in ("track", "identify"):
        raise _BadLine(f"`type` is {kind!r}; only 'track' and 'identify' are sent")
    if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
        raise _BadLine("`userId` is missing (anonymous calls cannot reach Crisp)")
    if not isinstance(user_id, str | int) or isinstance(user_id, bool):
        raise _BadLine("`userId` must be a string")
    user = str(user_id).strip()
    if kind == "identify":
        traits = message.get("traits", {})
        if not isinstance(traits, dict):
            raise _BadLine("`traits` must be an object")
        return IdentifyCall(user_id=user, traits=traits)
    event = message.get("event")
    if not isinstance(event, str) or not event.strip():
        raise _BadLine("a track message needs a non-empty `event`")
    properties = message.get("properties", {})
    if not isinstance(properties, dict):
        raise _BadLine("`properties` must be an object")
    context = message.get("context") or {}
    traits = context.get("traits") if isinstance(context, dict) else None
    email = traits.get("email") if isinstance(traits, dict) else None
    return TrackEvent(
        user_id=user,
        event=event.strip(),
        properties=properties,
        email=email if isinstance(email, str) else None,
    )


def sends_here(message: dict[str, Any]) -> bool:
    """Whether a message's Integrations object lets it reach this destination, as Segment
    reads it: ``"Crisp"`` decides when present (anything but ``false``, e.g. an options
    object, turns it on), else ``"All"`` (on by default)."""
    integrations = message.get("integrations")
    if not isinstance(integrations, dict):
        return True
    own = integrations.get(INTEGRATION)
    if own is None:
        return integrations.get("All", True) is not False
    return own is not False


def read_calls(path: Path) -> CallFile:
    """The Track/Identify messages of a JSONL file.

    A line that is not one (invalid JSON, a ``page`` call, an anonymous call...) is skipped and
    reported with its number; a message whose Integrations object turns this destination off is
    counted and left out. Only an unreadable file is an error.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: cannot read: {exc}") from None
    calls: list[Call] = []
    skipped: list[SkippedLine] = []
    off = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(SkippedLine(number, f"not valid JSON ({exc.msg})"))
            continue
        try:
            call = _call(message)
        except _BadLine as exc:
            skipped.append(SkippedLine(number, str(exc)))
            continue
        if sends_here(message):
            calls.append(call)
        else:
            off += 1
    for s in skipped[:SAMPLE_SIZE]:
        log.warning("track file=%s line=%d skipped: %s", path, s.line, s.reason)
    return CallFile(calls, tuple(skipped), off)


def track(
    config: Config,
    calls: Sequence[Call],
    *,
    destination: Destination | None = None,
    skipped_lines: Sequence[SkippedLine] = (),
    integrations_off: int = 0,
) -> CallResult:
    """Send ``calls`` to the configured destination; one outcome per call, in order.

    ``skipped_lines`` and ``integrations_off`` (from ``read_calls``) are reported with them.
    """
    with resources(config, destination) as (engine, dest):
        ready(config, engine, dest)

        async def send() -> list[Outcome]:
            async with dest:
                return await dest.send_calls(calls)

        outcomes = asyncio.run(send()) if calls else []
        result = CallResult(
            dest.name, tuple(calls), tuple(outcomes), tuple(skipped_lines), integrations_off
        )
        log.info(
            "track destination=%s calls=%d %s",
            dest.name,
            len(calls),
            " ".join(f"{k}={v}" for k, v in result.counts.items()),
        )
        return result
