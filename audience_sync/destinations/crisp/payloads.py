"""Request bodies for Crisp, built from audience-sync values. Pure functions: no I/O.

Crisp's shapes (CRISP.md): a profile card is ``{"email", "person": {"nickname", "phone",
"avatar"}}``; custom data is always wrapped as ``{"data": {key: value}}`` with keys
``[a-z0-9_-]`` and boolean, string or number values.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from audience_sync.model import Change, Identity
from audience_sync.naming import trait_key

__all__ = [
    "DATA_KEY",
    "ENTERED_EVENT",
    "EVENT_NAME_FIELDS",
    "EXITED_EVENT",
    "DataValue",
    "audience_event",
    "batch_body",
    "card_hash",
    "data_body",
    "event_body",
    "identify_parts",
    "profile_card",
]

DataValue = bool | str | int | float | None
DATA_KEY = re.compile(r"\A[a-z0-9_-]+\Z")

# Identity traits -> the profile's ``person`` fields.
_PERSON = {"name": "nickname", "phone": "phone", "avatar": "avatar"}


def profile_card(identity: Identity) -> dict[str, Any]:
    """The profile body for ``identity``: email (when known) and the person fields it has."""
    card: dict[str, Any] = {}
    if identity.email:
        card["email"] = identity.email
    person = {
        field: value for trait, field in _PERSON.items() if (value := getattr(identity, trait))
    }
    if person:
        card["person"] = person
    return card


def card_hash(card: Mapping[str, Any]) -> str:
    """Fingerprint of a profile card, to send a profile update only when it changed."""
    text = json.dumps(card, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def data_body(traits: Mapping[str, DataValue]) -> dict[str, Any]:
    """``PATCH /people/data/{id}``: merge ``traits`` into the profile's custom data."""
    return {"data": dict(traits)}


def batch_body(people_ids: Sequence[str], traits: Mapping[str, DataValue]) -> dict[str, Any]:
    """``PATCH /batch/data``: the same data on many profiles (shape per node client 10.10.1)."""
    return {"people": {"profiles": list(people_ids)}, "data": dict(traits)}


def event_body(
    text: str, data: Mapping[str, Any] | None = None, color: str | None = None
) -> dict[str, Any]:
    """``POST /people/events/{id}``: one event in the profile's event stream."""
    body: dict[str, Any] = {"text": text, "data": dict(data or {})}
    if color is not None:
        body["color"] = color
    return body


#: Engage's Track event names for audience changes (the ``entered_event`` defaults).
ENTERED_EVENT = "Audience Entered"
EXITED_EVENT = "Audience Exited"
#: The fields an event name may use: ``{audience}`` (the name) and ``{key}`` (the trait key).
EVENT_NAME_FIELDS = ("audience", "key")


def audience_event(
    change: Change, entered: str = ENTERED_EVENT, exited: str = EXITED_EVENT
) -> dict[str, Any]:
    """The event of one change, named as Engage names its Track calls (``entered`` /
    ``exited``, with ``{audience}`` and ``{key}`` filled in), and Engage's properties plus the
    audience's name as its data."""
    name = (entered if change.value else exited).format(
        audience=change.audience_name, key=change.audience_key
    )
    return event_body(
        name,
        {
            "audience_key": change.audience_key,
            "audience_name": change.audience_name,
            change.audience_key: change.value,
        },
        "green" if change.value else "grey",
    )


def identify_parts(traits: Mapping[str, Any]) -> tuple[Identity, dict[str, DataValue], list[str]]:
    """Split a Segment Identify's traits into identity, custom data and the keys left out.

    ``email``/``name``/``phone``/``avatar`` (and Segment's ``firstName``+``lastName``) are the
    identity; every other trait becomes custom data under its snake_cased key. Values that are
    not a boolean, string or number (null, lists, objects) cannot be Crisp data and are left out.
    """
    identity: dict[str, str] = {}
    data: dict[str, DataValue] = {}
    left_out: list[str] = []
    for key, value in traits.items():
        if key in ("email", "name", "phone", "avatar"):
            if isinstance(value, str) and value.strip():
                identity[key] = value.strip()
            continue
        if key in ("firstName", "lastName", "first_name", "last_name"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            left_out.append(key)
            continue
        if not isinstance(value, bool | str | int | float):
            left_out.append(key)
            continue
        try:
            data_key = key if DATA_KEY.fullmatch(key) else trait_key(key)
        except ValueError:
            left_out.append(key)
            continue
        data[data_key] = value
    if "name" not in identity:
        first = traits.get("firstName", traits.get("first_name"))
        last = traits.get("lastName", traits.get("last_name"))
        full = " ".join(str(p).strip() for p in (first, last) if isinstance(p, str) and p.strip())
        if full:
            identity["name"] = full
    return Identity(**identity), data, left_out
