"""What a sync call returns: one ``AudienceResult`` per audience (its ``sync_runs`` row as a
value) inside a ``SyncResult``, whose exit code the CLI uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from audience_sync.config import AudienceConfig
from audience_sync.errors import AudienceSyncError, SnapshotError
from audience_sync.model import RejectedRow, RunMode, RunStatus

__all__ = ["PARTIAL_EXIT_CODE", "AudienceResult", "SyncResult"]

#: Exit code of a run that left users failed, skipped or pending.
PARTIAL_EXIT_CODE = 5


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
    def exit_code(self) -> int:
        """0 when all succeeded; else the most severe audience's code (see ``errors``)."""
        codes = [0]
        for r in self.audiences:
            if r.error_type is not None:
                codes.append(r.error_type.exit_code)
            elif r.status is RunStatus.FAILED:
                codes.append(AudienceSyncError.exit_code)
            elif r.counts.get("rejected_rows"):
                codes.append(SnapshotError.exit_code)
            elif r.status in (RunStatus.PARTIAL, RunStatus.INTERRUPTED):
                codes.append(PARTIAL_EXIT_CODE)
        severity = [0, PARTIAL_EXIT_CODE, 4, 1, 6, 9, 7, 3]
        return max(codes, key=severity.index)
