"""The ``[destination] type = "crisp"`` settings, and the credentials, which come only from the
environment and never print.

Settings are validated with the rest of the config file (``CRISP_WEBSITE_ID`` overrides
``website_id``); credentials are read when a run starts (``preflight``), so ``--dry-run`` and
``history`` work without them.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from audience_sync.destinations.base import DestinationSettings
from audience_sync.destinations.crisp.payloads import (
    ENTERED_EVENT,
    EVENT_NAME_FIELDS,
    EXITED_EVENT,
)
from audience_sync.errors import CredentialsError

__all__ = [
    "IDENTIFIER_ENV",
    "KEY_ENV",
    "WEBSITE_ID_ENV",
    "CrispCredentials",
    "CrispSettings",
    "Secret",
]

WEBSITE_ID_ENV = "CRISP_WEBSITE_ID"
IDENTIFIER_ENV = "CRISP_IDENTIFIER"
KEY_ENV = "CRISP_KEY"

# Keys someone may be tempted to put in the TOML file: refused with a pointer to the environment.
_SECRET_KEYS = ("identifier", "key", "token", "api_key", "password", "secret")


class CrispSettings(DestinationSettings):
    """``[destination]`` for Crisp. Every number has a documented default."""

    website_id: str = Field(min_length=1)
    """Crisp website ID (Settings > Workspace Settings > Setup & Integrations); env overrides."""
    api_url: str = "https://api.crisp.chat/v1"
    """Base URL of Crisp's REST API; tests point it at a loopback server."""
    tier: Literal["plugin", "website"] = "plugin"
    """Token kind, sent as ``X-Crisp-Tier``: a Marketplace plugin token or a website token."""
    max_concurrency: int = Field(8, ge=1, le=64)
    """Requests in flight at once (also the HTTP connection pool size)."""
    requests_per_second: float = Field(10.0, gt=0, le=1000)
    """Client-side ceiling; lowered adaptively while Crisp answers 429/420."""
    daily_request_budget: int = Field(5000, ge=1)
    """Requests per UTC day this destination may make (Crisp: 5,000 plugin, 10,000 website)."""
    batch: bool = False
    """Send users whose change is identical as ``PATCH /batch/data`` (unverified route)."""
    batch_size: int = Field(100, ge=2, le=10000)
    """Profiles per batch request (halved automatically if Crisp refuses the size)."""
    batch_linger: float = Field(2.0, ge=0, le=300)
    """Seconds a partly filled batch waits for more users with the same change."""
    audience_events: bool = False
    """Also add an event per audience change to the profile's event stream (named below)."""
    clear_with: Literal["empty", "null"] = "empty"
    """What a computed trait's cleared value is sent as in the data ``PATCH``: ``"empty"``, an
    empty string (always accepted; the key stays, blank), or ``"null"`` (JSON null, for an
    account whose Crisp accepts it as "remove the key"; Crisp's docs list only string, number
    and boolean values, and a refused null fails the user's whole update). Never a ``PUT`` of
    the whole data object, which would wipe the keys other tools write."""
    entered_event: str = ENTERED_EVENT
    """Name of the event for a user who entered an audience (Engage's); ``{audience}`` and
    ``{key}`` are replaced by the audience's name and key: ``"Audience Entered: {audience}"``
    is the naming of audience-sync 0.1, which tells audiences apart in Crisp's event list."""
    exited_event: str = EXITED_EVENT
    """Name of the event for a user who left an audience (see ``entered_event``)."""
    update_profiles: bool = True
    """Send ``name``/``phone``/``avatar``/``email`` changes to the profile (one extra request
    for a user whose identity changed, or who already had a profile made elsewhere)."""
    timeout: float = Field(30.0, gt=0, le=600)
    """Seconds to wait for one response."""
    max_retries: int = Field(4, ge=0, le=20)
    """Retries of a request after a 5xx, 422, timeout or connection error."""
    rate_limit_patience: float = Field(600.0, gt=0)
    """Seconds of uninterrupted 429/420 after which the daily quota is taken as spent."""

    @property
    def request_budget(self) -> int:
        return self.daily_request_budget

    @model_validator(mode="before")
    @classmethod
    def _no_secrets_in_file(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            found = [k for k in _SECRET_KEYS if k in data]
            if found:
                raise ValueError(
                    f"`{found[0]}` does not belong in the config file: Crisp credentials are read "
                    f"only from the environment (${IDENTIFIER_ENV} and ${KEY_ENV})"
                )
        return data

    @field_validator("entered_event", "exited_event")
    @classmethod
    def _event_name(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a valid event name template ({exc})") from None
        unknown = fields - set(EVENT_NAME_FIELDS)
        if unknown or not v.strip():
            raise ValueError(
                f"{v!r}: an event name is text that may use {{audience}} and {{key}}, "
                "e.g. 'Audience Entered' or 'Audience Entered: {audience}'"
            )
        return v

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError(f"{v!r} is not an http(s) URL, e.g. 'https://api.crisp.chat/v1'")
        return v.rstrip("/")

    @classmethod
    def from_config(cls, table: Mapping[str, Any], env: Mapping[str, str]) -> Self:
        options = dict(table)
        if env.get(WEBSITE_ID_ENV):
            options["website_id"] = env[WEBSITE_ID_ENV]
        elif "website_id" not in options:
            # pydantic's "missing" would not say where else the value was looked for.
            raise ValueError(
                f"website_id: missing; set `website_id` in [destination] or ${WEBSITE_ID_ENV}"
            )
        return cls.model_validate(options)


class Secret:
    """A credential value: usable through ``reveal()``, never shown by ``repr`` or ``str``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # no pickling a secret into a log or a cache by accident
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True, repr=False)
class CrispCredentials:
    """The token pair of a Crisp plugin or website token."""

    identifier: Secret
    key: Secret

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CrispCredentials:
        """Read ``$CRISP_IDENTIFIER`` and ``$CRISP_KEY``; name any that is missing."""
        missing = [name for name in (IDENTIFIER_ENV, KEY_ENV) if not env.get(name, "").strip()]
        if missing:
            raise CredentialsError(
                f"Crisp credentials missing: set {' and '.join('$' + m for m in missing)} in the "
                "environment (the token's identifier and key; see docs/crisp.md). "
                "They are never read from the config file."
            )
        return cls(Secret(env[IDENTIFIER_ENV].strip()), Secret(env[KEY_ENV].strip()))

    def __repr__(self) -> str:
        return "CrispCredentials(identifier=Secret('**********'), key=Secret('**********'))"
