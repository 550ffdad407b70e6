"""The history pages as HTML: Jinja2 templates (autoescaped: every value from the database is
text, never markup) around one inline stylesheet, and no JavaScript.

The same section templates make the pages ``audience-sync ui`` serves and the one file
``audience-sync report --html`` writes; only the links differ (a path or an in-page anchor).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import urllib.parse
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import jinja2
from markupsafe import Markup

from audience_sync.durations import format_duration, parse_duration
from audience_sync.web.views import History, duration

__all__ = ["CSP", "NAV", "Links", "Pages", "ReportLinks", "content_security_policy"]

#: The pages of the navigation bar: (name, title).
NAV = (
    ("health", "Health"),
    ("runs", "Runs"),
    ("quota", "Quota"),
    ("retry", "Retry queue"),
    ("user", "User lookup"),
)

_TONES = {
    "succeeded": "ok",
    "healthy": "ok",
    "delivered": "ok",
    "partial": "warn",
    "interrupted": "warn",
    "late": "warn",
    "skipped": "warn",
    "failed": "bad",
    "failing": "bad",
    "overdue": "bad",
    "running": "run",
}


def _css() -> str:
    return (importlib.resources.files("audience_sync.web") / "templates" / "style.css").read_text(
        encoding="utf-8"
    )


def content_security_policy(css: str) -> str:
    """Nothing may load, run or frame the page; only our own stylesheet (by its hash) applies,
    and the filter forms may submit to this server."""
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src data:; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


CSP = content_security_policy(_css())
#: The report's own policy, in a ``<meta>`` tag (where ``frame-ancestors`` does not apply).
CSP_META = CSP.removesuffix("; frame-ancestors 'none'")


class Links:
    """Where the pages link: paths of the ``ui`` server."""

    report = False

    def page(self, name: str) -> str:
        return "/" if name == "health" else f"/{name}"

    def run(self, run_id: int) -> str:
        return f"/runs/{run_id}"

    def user(self, user_id: str) -> str:
        return "/user?" + urllib.parse.urlencode({"id": user_id})


class ReportLinks(Links):
    """Where the one-file report links: anchors within itself."""

    report = True

    def page(self, name: str) -> str:
        return f"#{name}"

    def run(self, run_id: int) -> str:
        return f"#run-{run_id}"

    def user(self, user_id: str) -> str:
        return "#user-" + urllib.parse.quote(user_id, safe="")


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    delta = now - value
    if delta < timedelta(seconds=1):
        return "just now" if delta > -timedelta(seconds=1) else "in " + format_duration(-delta)
    return format_duration(timedelta(seconds=int(delta.total_seconds()))) + " ago"


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("audience_sync.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, num=_num, duration=duration)
    env.filters["tone"] = lambda status: _TONES.get(str(status), "none")
    return env


class Pages:
    """Renders each page (``ui``) or all of them in one document (``report``)."""

    def __init__(self, history: History, links: Links | None = None) -> None:
        self.history = history
        self.links = links or Links()
        self.css = _css()

    def _section(self, name: str, **context: Any) -> Markup:
        now = self.history.now()
        template = _environment().get_template(f"{name}.html")
        return Markup(
            template.render(
                links=self.links,
                now=now,
                ago=lambda v: _ago(v, now),
                destination=self.history.config.destination.name,
                **context,
            )
        )

    def _document(self, title: str, active: str, body: Markup) -> str:
        return (
            _environment()
            .get_template("layout.html")
            .render(
                title=title,
                active=active,
                body=body,
                nav=NAV,
                links=self.links,
                css=Markup(self.css),
                csp_meta=CSP_META,
                destination=self.history.config.destination.name,
                generated=self.history.now(),
            )
        )

    # -- sections -------------------------------------------------------------------------------

    def health_section(self) -> Markup:
        return self._section("health", rows=self.history.health())

    def runs_section(self, audiences: Sequence[str], window: str) -> Markup:
        span = None if window == "all" else _window(window)
        groups = self.history.runs(audiences, span, run_href=self.links.run)
        return self._section(
            "runs",
            groups=groups,
            choices=self.history.audience_names(),
            selected=set(audiences),
            window=window,
            windows=WINDOWS,
        )

    def run_section(self, run_id: int) -> Markup | None:
        found = self.history.run(run_id)
        if found is None:
            return None
        detail, rejected = found
        return self._section("run", detail=detail, run=detail.run, rejected=rejected)

    def quota_section(self) -> Markup:
        return self._section("quota", quotas=self.history.quota())

    def retry_section(self) -> Markup:
        groups, users = self.history.retry()
        return self._section("retry", groups=groups, users=users)

    def user_section(self, user_id: str | None) -> Markup:
        changes = self.history.user(user_id) if user_id else []
        return self._section("user", user_id=user_id, changes=changes)

    # -- whole documents ------------------------------------------------------------------------

    def page(self, name: str, title: str, body: Markup) -> str:
        return self._document(f"{title} · audience-sync", name, body)

    def report(
        self, audiences: Sequence[str], window: str, users: Sequence[str], runs: int = 50
    ) -> str:
        """Every page in one document: health, runs, the detail of the newest ``runs`` runs in
        the window, quota, retry queue and the change log of each of ``users``."""
        span = None if window == "all" else _window(window)
        since = self.history.now() - span if span is not None else None
        newest = self.history.store.runs(
            destination=self.history.config.destination.name,
            audience_keys=audiences,
            limit=runs,
            since=since,
        )
        parts = [
            self.health_section(),
            self.runs_section(audiences, window),
            *(s for r in newest if (s := self.run_section(r["id"])) is not None),
            self.quota_section(),
            self.retry_section(),
            *(self.user_section(u) for u in users),
        ]
        if not users:
            parts.append(self.user_section(None))
        return self._document("audience-sync report", "", Markup("\n").join(parts))


#: The time windows the runs page offers.
WINDOWS = ("24h", "7d", "30d", "90d", "all")


def _window(text: str) -> timedelta:
    return parse_duration(text)
