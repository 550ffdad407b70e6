"""``audience-sync ui``: the history pages over HTTP, from the standard library's threading
server. Read-only by construction (the engine refuses writes) and by protocol (GET and HEAD
only), and strict about who may ask:

- it binds 127.0.0.1 unless told otherwise, and then checks the ``Host`` header too, so a web
  page that rebinds its own DNS name to 127.0.0.1 is refused (its requests carry its name);
- on any other address it needs a token on every request: ``?token=`` once (it becomes an
  ``HttpOnly`` same-site cookie), the cookie, or ``Authorization: Bearer``.

Every response forbids scripts, framing and loading anything (``CSP``).
"""

from __future__ import annotations

import hmac
import http.cookies
import ipaddress
import logging
import re
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from markupsafe import Markup

from audience_sync.errors import AudienceSyncError
from audience_sync.web.pages import CSP, WINDOWS, Pages

__all__ = ["HistoryServer", "is_loopback", "route"]

log = logging.getLogger(__name__)

_COOKIE = "audience_sync_ui"
_RUN = re.compile(r"/runs/(\d{1,18})")
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _message(pages: Pages, title: str, text: str) -> str:
    return pages.page(
        "", title, Markup("<section><h1>{}</h1><p>{}</p></section>").format(title, text)
    )


def route(pages: Pages, path: str, query: dict[str, list[str]]) -> tuple[int, str]:
    """The status and HTML of the page at ``path``."""

    def arg(name: str, default: str = "") -> str:
        return query.get(name, [default])[-1]

    if path in ("/", "/health"):
        return 200, pages.page("health", "Health", pages.health_section())
    if path == "/runs":
        window = arg("window", "30d") or "30d"
        if window not in WINDOWS:
            return 400, _message(
                pages, "Bad request", f"window must be one of {', '.join(WINDOWS)}"
            )
        audiences = [a for a in query.get("audience", []) if a]
        return 200, pages.page("runs", "Runs", pages.runs_section(audiences, window))
    if m := _RUN.fullmatch(path):
        section = pages.run_section(int(m[1]))
        if section is None:
            return 404, _message(pages, "Not found", f"There is no run {m[1]}.")
        return 200, pages.page("runs", f"Run {m[1]}", section)
    if path == "/quota":
        return 200, pages.page("quota", "Quota", pages.quota_section())
    if path == "/retry":
        return 200, pages.page("retry", "Retry queue", pages.retry_section())
    if path == "/user":
        user = arg("id").strip() or None
        return 200, pages.page("user", "User lookup", pages.user_section(user))
    return 404, _message(pages, "Not found", f"Nothing at {path}.")


class HistoryServer(ThreadingHTTPServer):
    """Serves ``pages``; ``token`` is required on a non-loopback address."""

    daemon_threads = True

    def __init__(self, host: str, port: int, pages: Pages, *, token: str | None) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"serving on {host} needs a token")
        super().__init__((host, port), _Handler)
        self.pages = pages
        self.token = token
        bound = self.server_address[1]
        # On loopback, only our own names (the usual ones and the address bound, which the
        # printed URL uses): a rebound DNS name carries the attacker's.
        names = frozenset({"127.0.0.1", "localhost", "[::1]", self.url_host})
        self.allowed_hosts: frozenset[str] | None = (
            frozenset(f"{h}:{bound}" for h in names) | (names if bound == 80 else frozenset())
            if is_loopback(host)
            else None
        )

    @property
    def url_host(self) -> str:
        """The bound address as a URL's host (IPv6 in brackets), lower case."""
        host = str(self.server_address[0]).lower()
        return f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"http://{self.url_host}:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: HistoryServer
    server_version = "audience-sync"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self._send(405, "read-only: only GET and HEAD\n", {"Allow": "GET, HEAD"}, html=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and (self.headers.get("Host") or "").lower() not in allowed:
            self._send(403, "unknown Host: open the address audience-sync ui printed\n", html=False)
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if self.server.token is not None and not self._authorised(url, query):
            return
        try:
            status, page = route(self.server.pages, url.path, query)
        except AudienceSyncError as exc:
            status, page = 503, _message(self.server.pages, "State database unavailable", str(exc))
        except Exception:
            log.exception("ui page %s failed", url.path)
            status, page = 500, "internal error (see the server's log)\n"
        self._send(status, page, html=status != 500)

    def _authorised(self, url: urllib.parse.SplitResult, query: dict[str, list[str]]) -> bool:
        """Whether the request carries the token; a ``?token=`` is swapped for a cookie."""
        expected = (self.server.token or "").encode()
        given = query.get("token", [""])[-1]
        if given and hmac.compare_digest(given.encode(), expected):
            rest = urllib.parse.urlencode(
                [(k, v) for k, vs in query.items() if k != "token" for v in vs]
            )
            self._send(
                303,
                "",
                {
                    # One leading "/" only: "//host" or "/\host" would leave the site.
                    "Location": "/" + url.path.lstrip("/\\") + (f"?{rest}" if rest else ""),
                    "Set-Cookie": f"{_COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/",
                },
                html=False,
            )
            return False
        cookie = http.cookies.SimpleCookie(self.headers.get("Cookie") or "")
        candidates = [
            cookie[_COOKIE].value if _COOKIE in cookie else "",
            (self.headers.get("Authorization") or "").removeprefix("Bearer "),
        ]
        if any(c and hmac.compare_digest(c.encode(), expected) for c in candidates):
            return True
        self._send(401, "a token is required: open the URL with ?token=...\n", html=False)
        return False

    def _send(
        self,
        status: int,
        text: str,
        headers: dict[str, str] | None = None,
        *,
        html: bool = True,
    ) -> None:
        data = text.encode("utf-8")
        self.send_response(status, HTTPStatus(status).phrase)
        kind = "text/html" if html else "text/plain"
        for name, value in {
            **_HEADERS,
            "Content-Type": f"{kind}; charset=utf-8",
            "Content-Length": str(len(data)),
            **(headers or {}),
        }.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Never the query string: it may hold the token.
        log.info("ui %s %s %s", self.command, urllib.parse.urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ui: " + format, *args)
