"""The diff: compare a snapshot's members with the last synced state, as a pure function.

No I/O, no clock: ids in, a ``Plan`` out. ``entered`` get ``true``, ``exited`` get ``false``;
a full resync also re-sends ``true`` to every unchanged member (``resend``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pandas as pd

__all__ = ["Plan", "plan"]

_EMPTY = pd.Index([], dtype="string[pyarrow]")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one audience's run must send."""

    entered: pd.Index
    exited: pd.Index
    resend: pd.Index
    unchanged: int

    @property
    def sends(self) -> int:
        """How many changes the plan sends (``true`` plus ``false``)."""
        return len(self.entered) + len(self.resend) + len(self.exited)


def plan(
    members: pd.Index,
    synced: pd.Index,
    *,
    full: bool = False,
    held: Collection[str] = (),
) -> Plan:
    """Diff ``members`` (this snapshot) against ``synced`` (the state's members).

    ``held`` users (rejected snapshot rows) are neither entered nor exited: whatever the state
    says about them stands. With ``full``, unchanged members are re-sent as ``resend``.
    """
    in_state = members.isin(synced)
    entered = members[~in_state]
    gone = ~synced.isin(members)
    if len(held):
        gone &= ~synced.isin(list(held))
    exited = synced[gone]
    unchanged = int((~gone).sum())  # state members who stay, held users included
    resend = members[in_state] if full else _EMPTY
    return Plan(entered=entered, exited=exited, resend=resend, unchanged=unchanged)
