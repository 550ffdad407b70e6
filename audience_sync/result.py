"""What a sync call returns: one ``AudienceResult`` per audience (its ``sync_runs`` row as a
value) inside a ``SyncResult``, whose exit code the CLI uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from audience_sync.config import AudienceConfig
from audience_sync.errors import AudienceSyncError, ExitCode, most_severe
from audience_sync.model import RejectedRow, RunMode, RunStatus

__all__ = ["AudienceResult", "SyncResult", "partial_reason"]


@dataclass(slots=True)
class AudienceResult:
    """What happened to one audience in a run (its ``sync_runs`` row, as a value)."""

    audience: AudienceConfig
    status: RunStatus
    mode: RunMode
    run_id: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    error_type: type[AudienceSyncError] | None = None
    rejected: tuple[RejectedRow, ...] = ()
    sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """What this audience alone would exit with."""
        if self.error_type is not None:
            return self.error_type.exit_code
        if self.status is RunStatus.FAILED:
            return AudienceSyncError.exit_code
        if self.counts.get("rejected_rows"):
            return ExitCode.SNAPSHOT
        if self.status in (RunStatus.PARTIAL, RunStatus.INTERRUPTED):
            return ExitCode.PARTIAL
        return ExitCode.OK


@dataclass(slots=True)
class SyncResult:
    """All audiences of one ``sync`` call."""

    destination: str
    dry_run: bool
    audiences: list[AudienceResult]
    cost: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Things the operator should act on that did not stop the run (e.g. audiences to retire)."""

    @property
    def exit_code(self) -> ExitCode:
        """``OK`` when all succeeded; else the most severe audience's code (see ``errors``)."""
        return most_severe(r.exit_code for r in self.audiences)


def partial_reason(counts: dict[str, int], run_id: int, held: int, exits_held: int) -> str:
    """Why a run that ran to the end is partial, and which command shows the details."""
    parts = []
    if counts["rejected_rows"]:
        held_note = (
            f" ({exits_held} exits held until a snapshot without rejected rows)"
            if exits_held
            else ""
        )
        parts.append(f"{counts['rejected_rows']} snapshot rows rejected{held_note}")
    if counts["failed"]:
        note = f" ({held} held after a permanent error; use --retry-failed)" if held else ""
        parts.append(f"{counts['failed']} users failed{note}")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} users skipped")
    if counts["pending"]:
        parts.append(f"{counts['pending']} changes pending")
    see = [f"`audience-sync history {run_id}`"] if counts["rejected_rows"] else []
    if counts["failed"] or counts["skipped"]:
        see.append("`audience-sync history --failed`")
    return "; ".join(parts) + (f"; see {' and '.join(see)}" if see else "")
