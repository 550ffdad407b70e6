"""The Crisp destination: audience memberships as people data, Track calls as people events.

``settings`` (config and credentials) -> ``client`` (httpx, pacing, budget, retries, with
``classify`` deciding what each answer means) -> ``profiles`` (one user's requests, with the
``people`` map of people_ids) -> ``delivery`` (concurrency, batching, the budget) ->
``destination`` (the Destination the engine opens).
"""

from __future__ import annotations

from audience_sync.destinations.crisp.classify import Verdict, classify
from audience_sync.destinations.crisp.destination import TRACK_DROPPED, CrispDestination
from audience_sync.destinations.crisp.profiles import EMAIL_REQUIRED
from audience_sync.destinations.crisp.settings import CrispCredentials, CrispSettings, Secret

__all__ = [
    "EMAIL_REQUIRED",
    "TRACK_DROPPED",
    "CrispCredentials",
    "CrispDestination",
    "CrispSettings",
    "Secret",
    "Verdict",
    "classify",
]
