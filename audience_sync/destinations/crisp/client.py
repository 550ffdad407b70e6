"""Crisp's REST API over ``httpx.AsyncClient``: pacing, the request budget, envelopes and retries.

``CrispClient.call`` sends one logical request and returns a ``Reply`` whose ``verdict`` says what
Crisp meant. It retries by itself what is worth retrying: rate limits (429/420) until
``rate_limit_patience`` runs out, and transient failures (5xx, 422, timeouts, connection errors)
up to ``max_retries`` times with exponential backoff and jitter, honouring ``Retry-After``.
Whole-run problems are raised: ``CredentialsError`` (401), ``QuotaExhausted``. The retry policy
is tenacity's, configured here and nowhere else.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from audience_sync.destinations.budget import RequestBudget
from audience_sync.destinations.crisp.classify import Verdict, classify
from audience_sync.destinations.crisp.ratelimit import AdaptiveRateLimiter
from audience_sync.errors import CredentialsError, QuotaExhausted

__all__ = ["CrispClient", "Reply", "segment"]

log = logging.getLogger("audience_sync.crisp")

#: Bytes of an odd answer's body quoted in a failure reason.
HEAD_BYTES = 60
#: Backoff of transient failures: 0.5 s, 1 s, 2 s, ... (each with jitter), at most this long.
TRANSIENT_BACKOFF_MAX = 30.0


def segment(value: str) -> str:
    """A path segment: a people_id or an email (``+`` and ``/`` must not leak into the path)."""
    return quote(value, safe="@")


@dataclass(frozen=True, slots=True)
class Reply:
    """Crisp's answer to one logical request (after retries)."""

    route: str
    """``METHOD /path/template`` for messages (never the people_id or email)."""
    status: int
    """HTTP status; 0 when no answer came (timeout, connection error)."""
    reason: str
    """The envelope's ``reason`` (or what went wrong on the wire)."""
    data: Any
    verdict: Verdict
    retry_after: float | None = None
    content_type: str = ""
    head: bytes = b""
    """The first bytes of the body, to say what Crisp answered when it is not an envelope."""
    attempts: int = 1
    """HTTP requests this answer took (retries included): what the daily budget counted."""

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    def describe_body(self) -> str:
        """``HTTP 200, text/html, 512 bytes: b'<!doctype html>...'`` (for odd answers)."""
        kind = self.content_type or "no content type"
        first = repr(self.head[:HEAD_BYTES]) if self.head else "an empty body"
        return f"HTTP {self.status} from {self.route}, {kind}, {first}"

    def describe(self) -> str:
        """``HTTP 400 invalid_data from PATCH /people/data`` (for failure reasons)."""
        what = f"HTTP {self.status} {self.reason}" if self.status else self.reason
        return f"{what} from {self.route}".strip()


class _Retry(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.describe())
        self.reply = reply


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date; ``None`` when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class CrispClient:
    """One website's people routes, shared by every worker of a run."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        limiter: AdaptiveRateLimiter,
        budget: RequestBudget,
        *,
        website_id: str,
        tier: str,
        max_retries: int,
        patience: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.http = http
        self.limiter = limiter
        self.budget = budget
        self.website_id = website_id
        self.tier = tier
        self.max_retries = max_retries
        self.patience = patience
        self._sleep = sleep
        self._rng = rng
        self.sent = 0
        """HTTP requests sent (every attempt counts: Crisp's quota counts them all)."""
        self.retried = 0

    async def call(
        self,
        method: str,
        path: str,
        *,
        route: str,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send ``method path`` (relative to the website) until Crisp gives a final answer."""
        transient = 0
        attempts = 0

        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retry) and exc.reply.verdict is Verdict.TRANSIENT:
                return transient > self.max_retries
            return False  # rate limits: never give up on the user (patience raises instead)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if not isinstance(exc, _Retry) or exc.reply.verdict is Verdict.RATE_LIMITED:
                return 0.0  # the limiter already pauses every request
            if exc.reply.retry_after is not None:
                return min(exc.reply.retry_after, TRANSIENT_BACKOFF_MAX * 4)
            backoff: float = min(TRANSIENT_BACKOFF_MAX, 0.5 * 2.0 ** (transient - 1))
            return backoff * (0.5 + self._rng() / 2)

        def before_sleep(state: RetryCallState) -> None:
            self.retried += 1

        async def attempt() -> Reply:
            nonlocal transient, attempts
            attempts += 1
            try:
                return await self._attempt(method, path, route=route, json=json, params=params)
            except _Retry as exc:
                if exc.reply.verdict is Verdict.TRANSIENT:
                    transient += 1  # counted here: tenacity runs `wait` before `stop`
                raise

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retry),
            stop=stop,
            wait=wait,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            reply: Reply = await retrying(attempt)
        except _Retry as exc:
            reply = exc.reply  # transient failures outlasted max_retries
        return replace(reply, attempts=attempts)

    async def _attempt(
        self,
        method: str,
        path: str,
        *,
        route: str,
        json: Any,
        params: Mapping[str, str] | None,
    ) -> Reply:
        await self.limiter.acquire()
        await self.budget.spend()  # raises QuotaExhausted before the budget is passed
        self.sent += 1
        reply = await self._send(method, path, route=route, json=json, params=params)
        verdict = reply.verdict
        if verdict is Verdict.RATE_LIMITED:
            self.limiter.on_rate_limited(reply.retry_after)
            if self.limiter.limited_for >= self.patience:
                raise await self._quota_spent(
                    f"Crisp kept answering {reply.status} (rate limited) for "
                    f"{self.limiter.limited_for:,.0f} s without a success, so the daily quota "
                    "looks spent"
                )
            raise _Retry(reply)
        if verdict is Verdict.QUOTA:
            raise await self._quota_spent(
                f"Crisp refused requests as over quota ({reply.describe()})"
            )
        if verdict is Verdict.CREDENTIALS:
            raise CredentialsError(
                f"Crisp rejected the credentials ({reply.describe()}): check that "
                f"$CRISP_IDENTIFIER and $CRISP_KEY hold the identifier and key of a {self.tier} "
                f"token for website {self.website_id}; the run stopped"
            )
        if verdict is Verdict.TRANSIENT:
            log.debug("transient answer %s; retrying", reply.describe())
            raise _Retry(reply)
        self.limiter.on_success()
        return reply

    async def _quota_spent(self, why: str) -> QuotaExhausted:
        used = await asyncio.to_thread(self.budget.used_today)
        return QuotaExhausted(
            f"quota: {why}; {used:,} of {self.budget.limit:,} requests counted today",
            used=used,
            budget=self.budget.limit,
        )

    async def _send(
        self,
        method: str,
        path: str,
        *,
        route: str,
        json: Any,
        params: Mapping[str, str] | None,
    ) -> Reply:
        try:
            response = await self.http.request(method, path, json=json, params=params)
        except httpx.TimeoutException:
            return Reply(route, 0, "timeout", None, Verdict.TRANSIENT)
        except httpx.TransportError as exc:
            return Reply(
                route, 0, f"connection error ({type(exc).__name__})", None, classify(0, None)
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        reason, data = "", None
        if isinstance(body, dict):
            reason = str(body.get("reason") or "")
            data = body.get("data")
        status = response.status_code
        return Reply(
            route,
            status,
            reason or response.reason_phrase.lower().replace(" ", "_"),
            data,
            classify(status, reason),
            retry_after_seconds(response.headers.get("Retry-After")),
            response.headers.get("Content-Type", ""),
            response.content[:HEAD_BYTES],
        )
