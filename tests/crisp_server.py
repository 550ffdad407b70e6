"""Crisp-compatible HTTP test server for the test-suite and the benchmark.

It mimics the routes, HTTP Basic + ``X-Crisp-Tier`` auth, ``{"error", "reason", "data"}``
envelopes and error reasons of Crisp's REST API v1 (see /work/shared/CRISP.md), keeps profiles in
memory, and injects faults on demand: latency, a per-second rate limit (429/420, optional
``Retry-After``), a daily quota, seeded random 503s, forced responses and dropped connections.
It binds 127.0.0.1 only (ephemeral port by default) and serves each connection in its own thread
with HTTP/1.1 keep-alive.

    with CrispServer(website_id="w1", identifier="id1", key="k1", tier="plugin") as srv:
        client = httpx.Client(base_url=srv.url, auth=("id1", "k1"),
                              headers={"X-Crisp-Tier": "plugin"})

Every request is recorded in ``srv.requests`` as ``(method, path, json_body_or_None, status)``;
``path`` is percent-decoded and keeps its query string; status 0 means the connection was dropped
(before the request was processed, or, with ``lose_answer_next`` / ``lose_answer_rate``, after:
the profile was created or the data set, but the answer never reaches the client).
``raw_next`` answers the next requests with a raw body that is not an envelope (a proxy's HTML
page, an empty body) without processing them.
Every authenticated request (whatever its answer) counts toward ``daily_quota``. Fault checks run
in this order: latency, dropped connection, auth, daily quota, rate limit, ``fail_next``,
``error_rate``, then the route itself.

Run ``python tests/crisp_server.py --port 0 --latency 0.05 --rate-limit 50`` to serve in the
foreground for manual testing.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import copy
import hmac
import itertools
import json
import math
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"  # never reachable off-machine
PAGE_SIZE = 20
DATA_KEY_RE = re.compile(r"^[a-z0-9_-]+$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class RecordedRequest(NamedTuple):
    """One request as seen by the server (a plain tuple for unpacking)."""

    method: str
    path: str
    body: Any
    status: int


class _Fail(Exception):
    """An error answer: status, Crisp reason and optional extra headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class _Answer(NamedTuple):
    status: int
    payload: dict[str, Any] | None  # None (and no raw): drop the connection without answering
    headers: dict[str, str]
    raw: tuple[str, bytes] | None = None  # (content type, body) instead of an envelope


def _envelope(error: bool, reason: str, data: Any) -> dict[str, Any]:
    return {"error": error, "reason": reason, "data": data}


def _valid_email(value: Any) -> bool:
    return isinstance(value, str) and "@" in value and value.strip() == value and len(value) > 2


def _valid_data(value: Any, *, null: bool = False) -> dict[str, bool | str | int | float]:
    """Validate a Crisp custom data object: keys ``^[a-z0-9_-]+$``, values bool/str/number
    (and, with ``null``, JSON null: an account where null removes a key)."""
    if not isinstance(value, dict):
        raise _Fail(400, "invalid_data")
    for key, item in value.items():
        if not isinstance(key, str) or not DATA_KEY_RE.match(key):
            raise _Fail(400, "invalid_data")
        if not isinstance(item, bool | str | int | float) and not (null and item is None):
            raise _Fail(400, "invalid_data")
    return cast(dict[str, bool | str | int | float], value)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the benchmark opens many connections at once

    def __init__(self, crisp: CrispServer, port: int) -> None:
        self.crisp = crisp
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock = cast(socket.socket, request)
        with self.sockets_lock:
            self.open_sockets.add(sock)
            self.crisp.connections += 1
        try:
            super().finish_request(request, client_address)
        finally:
            with self.sockets_lock:
                self.open_sockets.discard(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client went away mid-request: nothing to report in tests

    def close_open_sockets(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "CrispTestServer/1.0"
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms stalls

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        crisp = cast(_HTTPServer, self.server).crisp
        if crisp.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        crisp = cast(_HTTPServer, self.server).crisp
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            answer = _Answer(400, _envelope(True, "invalid_data", {}), {})
        else:
            answer = crisp._process(self.command, self.path, self.headers, raw)
        if answer.payload is None and answer.raw is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        ctype, body = answer.raw or ("application/json; charset=utf-8", b"")
        if answer.payload is not None:
            body = json.dumps(answer.payload).encode()
        self.send_response(answer.status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class CrispServer:
    """In-memory Crisp REST API v1 on 127.0.0.1; see the module docstring.

    Switches are plain attributes that tests may change at any time while the server runs.
    ``profiles`` may be read, and a profile's person/data edited, directly; change emails only
    through the API or ``add_profile`` (an email index keeps lookups O(1) for large benchmarks).
    """

    def __init__(
        self,
        website_id: str = "test-website",
        identifier: str = "test-identifier",
        key: str = "test-key",
        tier: str = "plugin",
        *,
        port: int = 0,
        latency: float = 0.0,
        rate_limit_per_second: int | None = None,
        rate_limit_status: int = 429,
        send_retry_after: bool = False,
        retry_after_seconds: int | None = None,
        daily_quota: int | None = None,
        error_rate: float = 0.0,
        seed: int = 0,
        conflict_status: int = 409,
        email_as_people_id: bool = True,
        batch_enabled: bool = True,
        batch_max: int = 100,
        batch_accepts_emails: bool = False,
        null_removes_data: bool = False,
        verbose: bool = False,
    ) -> None:
        self.website_id = website_id
        self.identifier = identifier
        self.key = key
        self.tier = tier
        self.port = port
        # fault injection switches
        self.latency = latency
        self.rate_limit_per_second = rate_limit_per_second
        self.rate_limit_status = rate_limit_status
        self.send_retry_after = send_retry_after
        self.retry_after_seconds = retry_after_seconds
        self.daily_quota = daily_quota
        self.error_rate = error_rate
        self.fail_next: list[tuple[int, str]] = []
        self.drop_connection_next = 0
        self.lose_answer_next = 0
        self.lose_answer_rate = 0.0
        self.lose_answer_match = ""
        """Only requests whose ``METHOD /path`` contains this lose their answer."""
        self.answers_lost = 0
        self.slow_answer_rate = 0.0
        """Share of processed requests answered only after ``slow_answer_seconds`` (a client
        timeout shorter than that never sees the answer; recorded with status 0)."""
        self.slow_answer_seconds = 1.0
        self.raw_next: list[tuple[int, str, bytes]] = []
        # behaviour switches
        self.conflict_status = conflict_status
        self.email_as_people_id = email_as_people_id
        # Crisp documents string, number and boolean data values only: null is refused unless
        # a test says this account takes it as "remove the key".
        self.null_removes_data = null_removes_data
        self.batch_enabled = batch_enabled
        self.batch_max = batch_max
        self.batch_accepts_emails = batch_accepts_emails
        self.verbose = verbose
        # state and inspection
        self.requests: list[RecordedRequest] = []
        self.profiles: dict[str, dict[str, Any]] = {}
        self.connections = 0  # TCP connections accepted (keep-alive reuse keeps this low)
        self.in_latency = 0
        self.peak_in_latency = 0
        """Most requests ever inside their ``latency`` at once (1 for a serial server)."""
        self.errors: list[Exception] = []  # unexpected exceptions answered as 500
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._window: deque[float] = deque()
        self._by_email: dict[str, str] = {}  # lowercased email -> people_id
        self._authenticated = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CrispServer:
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(self, self.port)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"crisp-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_open_sockets()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> CrispServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no API version)."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.base_url}/v1"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.identifier, self.key)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Crisp-Tier": self.tier}

    # -- inspection helpers ------------------------------------------------------------------

    def add_profile(
        self,
        email: str,
        person: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> str:
        """Create a pre-existing profile (e.g. made by the chat widget); return its people_id."""
        with self._lock:
            if self._find_email(email) is not None:
                raise ValueError(f"a profile already uses {email!r}")
            return self._create(email, dict(person or {}), dict(data or {}), [])

    def profile_by_email(self, email: str) -> dict[str, Any] | None:
        """The stored profile (with its ``people_id`` key) using ``email``, or None."""
        with self._lock:
            people_id = self._find_email(email)
            return None if people_id is None else self.profiles[people_id]

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of recorded requests matching the method and/or path substring."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method.upper())
                and (path_contains is None or path_contains in r.path)
            )

    def reset_counts(self) -> None:
        """Forget the recorded requests (profiles and quota are kept)."""
        with self._lock:
            self.requests.clear()

    def reset_quota(self) -> None:
        """The daily reset: the quota is available again."""
        with self._lock:
            self._authenticated = 0

    @property
    def quota_used(self) -> int:
        """Authenticated requests since the last ``reset_quota()``."""
        return self._authenticated

    # -- request processing ------------------------------------------------------------------

    def _record(self, method: str, path: str, body: Any, status: int) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, body, status))

    def _process(self, method: str, raw_path: str, headers: Any, raw: bytes) -> _Answer:
        body: Any = None
        body_ok = True
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_ok = False
        path = unquote(raw_path)
        if self.latency > 0:
            with self._lock:
                self.in_latency += 1
                self.peak_in_latency = max(self.peak_in_latency, self.in_latency)
            time.sleep(self.latency)
            with self._lock:
                self.in_latency -= 1
        with self._lock:
            if self.drop_connection_next > 0:
                self.drop_connection_next -= 1
                self._record(method, path, body, 0)
                return _Answer(0, None, {})
            if self.raw_next:
                status, ctype, raw_body = self.raw_next.pop(0)
                self._record(method, path, body, status)
                return _Answer(status, None, {}, (ctype, raw_body))
        try:
            self._check_auth(headers)
            self._check_faults()
            if raw:
                ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if ctype != "application/json" or not body_ok:
                    raise _Fail(400, "invalid_data")
            status, reason, data = self._route(method, raw_path, copy.deepcopy(body))
            answer = _Answer(status, _envelope(False, reason, data), {})
        except _Fail as fail:
            answer = _Answer(fail.status, _envelope(True, fail.reason, {}), fail.headers)
        except Exception as exc:  # a bug here must still answer, as a real API would
            with self._lock:
                self.errors.append(exc)
            answer = _Answer(500, _envelope(True, "server_error", {}), {})
        with self._lock:
            lose = self.lose_answer_match in f"{method} {path}" and (
                self.lose_answer_next > 0
                or (self.lose_answer_rate > 0 and self._rng.random() < self.lose_answer_rate)
            )
            if lose:
                self.lose_answer_next = max(self.lose_answer_next - 1, 0)
                self.answers_lost += 1
            slow = self.slow_answer_rate > 0 and self._rng.random() < self.slow_answer_rate
        if lose:  # processed, but the connection is cut before the answer goes out
            self._record(method, path, body, 0)
            return _Answer(0, None, {})
        if slow:  # processed, but answered after the client gave up waiting
            self._record(method, path, body, 0)
            time.sleep(self.slow_answer_seconds)
            return answer
        self._record(method, path, body, answer.status)
        return answer

    def _check_auth(self, headers: Any) -> None:
        header = headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            raise _Fail(401, "unauthorized")
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _Fail(401, "unauthorized") from exc
        identifier, sep, key = decoded.partition(":")
        expected = f"{self.identifier}:{self.key}"
        if not sep or not hmac.compare_digest(f"{identifier}:{key}", expected):
            raise _Fail(401, "unauthorized")
        if headers.get("X-Crisp-Tier") != self.tier:
            raise _Fail(403, "not_allowed")

    def _check_faults(self) -> None:
        with self._lock:
            self._authenticated += 1
            if self.daily_quota is not None and self._authenticated > self.daily_quota:
                raise _Fail(429, "quota_exceeded")
            limit = self.rate_limit_per_second
            if limit is not None:
                now = time.monotonic()
                while self._window and self._window[0] <= now - 1.0:
                    self._window.popleft()
                if len(self._window) >= limit:
                    extra: dict[str, str] = {}
                    if self.send_retry_after:
                        wait = self.retry_after_seconds
                        if wait is None:
                            wait = max(1, math.ceil(self._window[0] + 1.0 - now))
                        extra["Retry-After"] = str(wait)
                    raise _Fail(self.rate_limit_status, "rate_limited", extra)
                self._window.append(now)
            if self.fail_next:
                status, reason = self.fail_next.pop(0)
                raise _Fail(status, reason)
            if self.error_rate > 0 and self._rng.random() < self.error_rate:
                raise _Fail(503, "server_error")

    def _route(self, method: str, raw_path: str, body: Any) -> tuple[int, str, Any]:
        split = urlsplit(raw_path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        if segments[:2] != ["v1", "website"] or len(segments) < 4:
            raise _Fail(404, "not_found")
        if segments[2] != self.website_id:
            raise _Fail(404, "website_not_found")
        rest = segments[3:]
        query = parse_qs(split.query)
        with self._lock:
            status, reason, data = self._dispatch(method, rest, body, query)
            return status, reason, copy.deepcopy(data)  # serialised after the lock is released

    def _dispatch(
        self, method: str, rest: list[str], body: Any, query: dict[str, list[str]]
    ) -> tuple[int, str, Any]:
        match rest:
            case ["people", "profile"] if method == "POST":
                return self._add_profile(body)
            case ["people", "profile", arg]:
                return self._profile(method, arg, body)
            case ["people", "data", arg]:
                return self._data(method, arg, body)
            case ["people", "events", arg] if method == "POST":
                return self._add_event(arg, body)
            case ["people", "profiles", page] if method == "GET":
                return self._list_profiles(page, query)
            case ["batch", "data"] if method == "PATCH":
                return self._batch_data(body)
        raise _Fail(404, "not_found")

    # -- state (called with the lock held) -------------------------------------------------------

    def _find_email(self, email: str) -> str | None:
        wanted = email.lower()
        people_id = self._by_email.get(wanted)
        if people_id is None:
            return None
        profile = self.profiles.get(people_id)
        if profile is None or profile["email"].lower() != wanted:  # changed behind our back
            del self._by_email[wanted]
            return None
        return people_id

    def _create(
        self, email: str, person: dict[str, Any], data: dict[str, Any], segments: list[Any]
    ) -> str:
        people_id = str(uuid.uuid4())
        self._by_email[email.lower()] = people_id
        self.profiles[people_id] = {
            "people_id": people_id,
            "email": email,
            "person": person,
            "segments": segments,
            "data": data,
            "events": [],
        }
        return people_id

    def _resolve(self, arg: str, *, allow_email: bool) -> str:
        if UUID_RE.match(arg) and arg in self.profiles:
            return arg
        if allow_email and "@" in arg:
            people_id = self._find_email(arg)
            if people_id is not None:
                return people_id
        raise _Fail(404, "people_not_found")

    def _card(self, body: Any, *, require_email: bool) -> tuple[str | None, dict[str, Any]]:
        if not isinstance(body, dict):
            raise _Fail(400, "invalid_data")
        email = body.get("email")
        if (require_email or email is not None) and not _valid_email(email):
            raise _Fail(400, "invalid_data")
        person = body.get("person", {})
        if not isinstance(person, dict):
            raise _Fail(400, "invalid_data")
        segments = body.get("segments", [])
        if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
            raise _Fail(400, "invalid_data")
        return email, person

    def _add_profile(self, body: Any) -> tuple[int, str, Any]:
        email, person = self._card(body, require_email=True)
        assert email is not None
        if self._find_email(email) is not None:
            raise _Fail(self.conflict_status, "people_exists")
        people_id = self._create(email, dict(person), {}, list(body.get("segments", [])))
        return 201, "added", {"people_id": people_id}

    def _profile(self, method: str, arg: str, body: Any) -> tuple[int, str, Any]:
        people_id = self._resolve(arg, allow_email=self.email_as_people_id)
        profile = self.profiles[people_id]
        if method in ("GET", "HEAD"):
            view = {k: profile[k] for k in ("people_id", "email", "person", "segments")}
            return 200, "resolved", view
        if method == "DELETE":
            del self.profiles[people_id]
            self._by_email.pop(profile["email"].lower(), None)
            return 200, "deleted", {}
        if method in ("PATCH", "PUT"):
            email, person = self._card(body, require_email=method == "PUT")
            if email is not None:
                owner = self._find_email(email)
                if owner is not None and owner != people_id:
                    raise _Fail(self.conflict_status, "people_exists")
                self._by_email.pop(profile["email"].lower(), None)
                self._by_email[email.lower()] = people_id
                profile["email"] = email
            if method == "PUT":
                profile["person"] = dict(person)
                profile["segments"] = list(body.get("segments", []))
            else:
                profile["person"].update(person)
                if "segments" in body:
                    profile["segments"] = list(body["segments"])
            return 200, "updated", {}
        raise _Fail(404, "not_found")

    def _data(self, method: str, arg: str, body: Any) -> tuple[int, str, Any]:
        people_id = self._resolve(arg, allow_email=self.email_as_people_id)
        profile = self.profiles[people_id]
        if method == "GET":
            return 200, "resolved", {"data": dict(profile["data"])}
        if method in ("PATCH", "PUT"):
            if not isinstance(body, dict) or set(body) != {"data"}:
                raise _Fail(400, "invalid_data")
            data = _valid_data(body["data"], null=self.null_removes_data and method == "PATCH")
            if method == "PUT":
                profile["data"] = dict(data)
            else:
                profile["data"].update(data)
                for key in [k for k, v in data.items() if v is None]:
                    del profile["data"][key]
            return 200, "updated", {}
        raise _Fail(404, "not_found")

    def _add_event(self, arg: str, body: Any) -> tuple[int, str, Any]:
        people_id = self._resolve(arg, allow_email=self.email_as_people_id)
        if not isinstance(body, dict):
            raise _Fail(400, "invalid_data")
        text, data, color = body.get("text"), body.get("data", {}), body.get("color")
        if not isinstance(text, str) or not text or not isinstance(data, dict):
            raise _Fail(400, "invalid_data")
        if color is not None and not isinstance(color, str):
            raise _Fail(400, "invalid_data")
        event = {"text": text, "data": data, "color": color, "timestamp": time.time()}
        self.profiles[people_id]["events"].append(event)
        return 201, "added", {}

    def _list_profiles(self, page: str, query: dict[str, list[str]]) -> tuple[int, str, Any]:
        if not page.isdigit() or int(page) < 1:
            raise _Fail(400, "invalid_data")
        search = query.get("search_text", [None])[0]
        if search is None:
            start = (int(page) - 1) * PAGE_SIZE
            ids = list(itertools.islice(self.profiles, start, start + PAGE_SIZE))
        else:
            match = self._find_email(search)
            ids = [match] if match is not None and page == "1" else []
        found = [
            {
                "people_id": i,
                "email": self.profiles[i]["email"],
                "person": self.profiles[i]["person"],
            }
            for i in ids
        ]
        return 200, "listed", found

    def _batch_data(self, body: Any) -> tuple[int, str, Any]:
        if not self.batch_enabled:
            raise _Fail(404, "not_found")
        if not isinstance(body, dict) or not isinstance(body.get("people"), dict):
            raise _Fail(400, "invalid_data")
        ids = body["people"].get("profiles")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _Fail(400, "invalid_data")
        if len(ids) > self.batch_max:
            raise _Fail(400, "invalid_data")
        data = _valid_data(body.get("data"))
        targets = [self._resolve(i, allow_email=self.batch_accepts_emails) for i in ids]
        for people_id in targets:  # all-or-nothing: resolved every id before writing
            self.profiles[people_id]["data"].update(data)
        return 200, "updated", {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a Crisp-compatible API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--website-id", default="test-website")
    parser.add_argument("--identifier", default="test-identifier")
    parser.add_argument("--key", default="test-key")
    parser.add_argument("--tier", default="plugin", choices=["plugin", "website"])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--rate-limit", type=int, default=None, help="requests per second")
    parser.add_argument("--rate-limit-status", type=int, default=429)
    parser.add_argument("--retry-after", action="store_true", help="send Retry-After on 429")
    parser.add_argument("--daily-quota", type=int, default=None)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-batch", action="store_true", help="refuse PATCH /batch/data")
    parser.add_argument("--verbose", action="store_true", help="log each request")
    args = parser.parse_args(argv)
    server = CrispServer(
        website_id=args.website_id,
        identifier=args.identifier,
        key=args.key,
        tier=args.tier,
        port=args.port,
        latency=args.latency,
        rate_limit_per_second=args.rate_limit,
        rate_limit_status=args.rate_limit_status,
        send_retry_after=args.retry_after,
        daily_quota=args.daily_quota,
        error_rate=args.error_rate,
        seed=args.seed,
        batch_enabled=not args.no_batch,
        verbose=args.verbose,
    )
    with server:
        print(server.url, flush=True)
        print(
            f"website_id={server.website_id} identifier={server.identifier} key={server.key} "
            f"tier={server.tier}",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
