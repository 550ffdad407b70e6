"""One function turns Crisp's answer (status code and envelope ``reason``) into what to do.

Reasons are mapped, not only status codes: Crisp uses the same status for different problems
(``404 people_not_found`` is one unknown profile, ``404 website_not_found`` stops the run).
The callers decide per route what a verdict means (a refused batch route falls back to
per-user requests; a refused people route stops the run).
"""

from __future__ import annotations

import enum

__all__ = ["Verdict", "classify"]


class Verdict(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    """429 / 420: wait (``Retry-After`` or backoff), slow down, try again; never give up."""
    QUOTA = "quota"
    """The daily quota is spent: stop spending requests until the reset."""
    TRANSIENT = "transient"
    """5xx, 422, 408, timeouts, connection errors: retry a bounded number of times."""
    NOT_FOUND = "not_found"
    """No such profile (``people_not_found``): re-resolve or create it."""
    CONFLICT = "conflict"
    """The profile already exists (``people_exists``): resolve it instead of creating."""
    PERMANENT = "permanent"
    """This payload is refused (invalid email, invalid data): hold until the input changes."""
    REFUSED = "refused"
    """The route is not allowed for this token or does not exist (402, 403, 404 not_found)."""
    CREDENTIALS = "credentials"
    """The token is rejected: stop the run, change nothing."""
    WEBSITE = "website"
    """Crisp does not know the configured website: stop the run."""


_CREDENTIAL_REASONS = frozenset({"unauthorized", "invalid_session", "invalid_token"})


def classify(status: int, reason: str | None) -> Verdict:
    """The verdict for one HTTP answer; ``status`` 0 means no answer (timeout, dropped)."""
    reason = (reason or "").lower()
    if 200 <= status < 300:
        return Verdict.OK
    if status == 0:
        return Verdict.TRANSIENT
    if "quota" in reason:
        return Verdict.QUOTA
    if status in (420, 429):
        return Verdict.RATE_LIMITED
    if status == 401 or reason in _CREDENTIAL_REASONS:
        return Verdict.CREDENTIALS
    if reason == "website_not_found":
        return Verdict.WEBSITE
    if reason == "people_not_found":
        return Verdict.NOT_FOUND
    if status == 409 or reason == "people_exists":
        return Verdict.CONFLICT
    if status in (402, 403, 404, 405, 501):
        return Verdict.REFUSED
    if status in (408, 422, 425) or status >= 500:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT
