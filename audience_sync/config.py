"""Load ``config/audience-sync.toml`` into one frozen, validated ``Config``.

Every problem is reported before anything is sent, as a ``ConfigError`` naming the file, the key
(``audiences[1].schedule``) and the audience. Secrets never live here: destinations read them
from the environment, into types that do not print.
"""

from __future__ import annotations

import os
import tomllib
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from audience_sync.destinations import DestinationSettings, destination_class, kinds
from audience_sync.durations import parse_duration
from audience_sync.errors import ConfigError, StateMissing
from audience_sync.model import RESERVED_TRAIT_KEYS, SyncKind
from audience_sync.naming import TRAIT_KEY_PATTERN, trait_key

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "STATE_URL_ENV",
    "WEBHOOK_URL_ENV",
    "AlertConfig",
    "AudienceConfig",
    "ComputedTraitConfig",
    "Config",
    "DestinationConfig",
    "SafeguardConfig",
    "ServiceConfig",
    "StateConfig",
    "load_config",
    "sqlite_path",
]

DEFAULT_CONFIG_PATH = Path("config/audience-sync.toml")
STATE_URL_ENV = "AUDIENCE_SYNC_STATE_URL"
WEBHOOK_URL_ENV = "AUDIENCE_SYNC_WEBHOOK_URL"
DEFAULT_STATE_URL = "sqlite:///audience_sync.db"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: object) -> object:
    return parse_duration(value) if isinstance(value, str) else value


#: A duration written as ``"90s"``, ``"2h"``, ``"1h30m"`` or a number of seconds.
Duration = Annotated[timedelta, BeforeValidator(_duration)]
#: A share of an audience's members, 0.0 to 1.0.
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class StateConfig(_Strict):
    """``[state]``: where the last synced state and the run history live."""

    url: str = Field(DEFAULT_STATE_URL, repr=False)  # may hold a password
    change_log: bool = True
    """Write one ``sync_changes`` row per attempted user change."""
    auto_migrate: bool = True
    """Bring the schema to the current version at the start of ``run`` and ``serve``."""
    skip_unchanged: bool = True
    """Skip reading the state and diffing for a file snapshot unchanged since a run left the
    state equal to it (its fingerprint); false: every run diffs (after editing the state)."""
    member_cache: bool = True
    """Keep a copy of each audience's confirmed members in a file (``state/membercache.py``),
    so a changed file snapshot is diffed without reading them from the database. Needs
    ``skip_unchanged`` (the copy is named by the same fact); false: always read the database."""
    cache_dir: Path | None = None
    """The member cache's folder (relative: to the config file's). Default: beside a SQLite
    state file, ``<file>.cache``; else ``$XDG_CACHE_HOME/audience-sync/<hash of the URL>``."""

    def member_cache_folder(self) -> Path | None:
        """Where the member cache lives; None when it is off or the state is in memory."""
        if not (self.member_cache and self.skip_unchanged):
            return None
        if self.cache_dir is not None:
            return self.cache_dir
        database = sqlite_path(self.url)
        if database is not None:
            return database.with_name(database.name + ".cache")
        if self.url.startswith("sqlite"):
            return None  # in memory: gone with the process, nothing to cache for
        import hashlib

        from sqlalchemy.engine import make_url

        # Named by the database, never its password: one folder per state database.
        where = make_url(self.url).set(password=None).render_as_string(hide_password=True)
        name = hashlib.blake2b(where.encode(), digest_size=8).hexdigest()
        home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(home) / "audience-sync" / name


class AudienceConfig(_Strict):
    """One ``[[audiences]]`` entry (and the base of ``[[computed_traits]]``)."""

    kind: ClassVar[SyncKind] = SyncKind.AUDIENCE
    #: The word for it in messages and the config's table name.
    noun: ClassVar[str] = "audience"
    table: ClassVar[str] = "audiences"

    name: str = Field(min_length=1)
    key: str | None = None
    source: Path | None = None
    query: str | None = None
    source_url: str | None = Field(None, repr=False)  # may hold a password
    schedule: str | None = None
    interval: Duration | None = None
    """Run every ``interval`` (e.g. ``"2h"``) instead of on a cron ``schedule``."""
    max_exit_ratio: Ratio | None = None
    """Overrides ``[safeguards] max_exit_ratio`` for this audience."""
    max_snapshot_age: Duration | None = None
    """Overrides ``[safeguards] max_snapshot_age`` for this audience."""
    allow_empty: bool | None = None
    """Overrides ``[safeguards] allow_empty`` for this audience."""
    allow_multiline_values: bool = False
    """A CSV snapshot's quoted values may span lines (else that is a snapshot error)."""

    @field_validator("key")
    @classmethod
    def _key_is_snake_case(cls, v: str | None) -> str | None:
        if v is not None and not TRAIT_KEY_PATTERN.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid trait key: use lower-case letters and digits joined by "
                "single underscores, e.g. 'order_completed_last_30days'"
            )
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule_is_cron(cls, v: str | None) -> str | None:
        if v is not None:
            from apscheduler.triggers.cron import CronTrigger  # only when a schedule is given

            try:
                CronTrigger.from_crontab(v, timezone="UTC")
            except ValueError as exc:
                raise ValueError(
                    f"{v!r} is not a valid cron expression ({exc}); "
                    "expected 5 fields: minute hour day month weekday, e.g. '0 */3 * * *'"
                ) from None
        return v

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.source is not None and (self.query is not None or self.source_url is not None):
            raise ValueError("give either `source` (a file) or `query` + `source_url`, not both")
        if self.query is not None and self.source_url is None:
            raise ValueError("`query` needs `source_url`, the SQLAlchemy URL of the database")
        if self.source_url is not None and self.query is None:
            raise ValueError("`source_url` needs `query`, the SQL that selects the members")
        if self.source is None and self.query is None:
            raise ValueError("missing `source` (a .csv or .parquet file) or `query` + `source_url`")
        if self.source is not None and self.source.suffix.lower() not in (".csv", ".parquet"):
            raise ValueError(f"`source` {str(self.source)!r} must end in .csv or .parquet")
        if self.key is None:
            trait_key(self.name)  # raises when the name has nothing to build a key from
        if self.schedule is not None and self.interval is not None:
            raise ValueError("give either `schedule` (cron) or `interval` (e.g. '2h'), not both")
        return self

    @property
    def trait_key(self) -> str:
        """The key Crisp receives: the explicit ``key``, else the snake_cased name."""
        return self.key if self.key is not None else trait_key(self.name)

    @property
    def source_label(self) -> str:
        """Where the snapshot comes from, for messages (never the source URL's password)."""
        return str(self.source) if self.source is not None else "SQL query"

    @property
    def computed(self) -> bool:
        """Whether this is a computed trait (a value per user) rather than an audience."""
        return self.kind is SyncKind.TRAIT


#: How a computed trait's values are read: ``auto`` types text by its look (``true``/``false``,
#: numbers, else a string) and keeps typed columns' types; the others force one type.
ValueType = Literal["auto", "string", "number", "boolean", "date"]


class ComputedTraitConfig(AudienceConfig):
    """One ``[[computed_traits]]`` entry: a value per user, sent when it changes."""

    kind: ClassVar[SyncKind] = SyncKind.TRAIT
    noun: ClassVar[str] = "computed trait"
    table: ClassVar[str] = "computed_traits"

    column: str | None = Field(None, min_length=1)
    """The snapshot column holding the value; default: the trait key."""
    type: ValueType = "auto"
    """How the values are read (``auto``: by their look; see the README)."""

    @field_validator("column")
    @classmethod
    def _not_user_id(cls, v: str | None) -> str | None:
        if v is not None and v.strip() == "user_id":
            raise ValueError("`column` names the value column; it cannot be `user_id`")
        return v.strip() if v is not None else v

    @property
    def value_column(self) -> str:
        """The snapshot column holding the value."""
        return self.column if self.column is not None else self.trait_key


class ServiceConfig(_Strict):
    """``[service]``: the scheduler of ``serve``, the run lock and how runs stop on a signal."""

    timezone: str = "UTC"
    """Time zone of the audiences' cron schedules."""
    misfire_grace: Duration = timedelta(hours=1)
    """A run missed (service down, or busy) is still made up if it is at most this late."""
    lock_ttl: Duration = timedelta(seconds=60)
    """Lease of the run lock; a killed process's lock is taken over this long after its death."""
    stop_timeout: Duration = timedelta(seconds=30)
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish before we cancel."""
    progress_every: Duration = timedelta(seconds=30)
    """Off a terminal, ``run`` and ``serve`` log a progress line this often during a run."""
    overdue_after: Duration = timedelta(minutes=15)
    """``status`` calls an audience overdue when a scheduled run is this late."""
    metrics_textfile: Path | None = None
    """Write Prometheus metrics to this file after each run (node_exporter textfile)."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve Prometheus metrics over HTTP on this port (``serve`` only)."""
    metrics_host: str = Field("127.0.0.1", min_length=1)
    """The address ``metrics_port`` binds to: this host only unless set (``0.0.0.0``: all)."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{v!r} is not a known time zone; use an IANA name such as 'UTC' or 'Europe/Paris'"
            ) from None
        return v


class SafeguardConfig(_Strict):
    """``[safeguards]``: snapshots that look broken are refused (``--force`` overrides)."""

    max_exit_ratio: Ratio = 0.5
    """Refuse a snapshot that would set more than this share of current members to false."""
    allow_empty: bool = False
    """Accept an empty snapshot for an audience that has members (it would remove them all)."""
    max_snapshot_age: Duration | None = None
    """Refuse a snapshot older than this (file mtime, or a ``snapshot_at`` column)."""
    max_initial_sync: int = Field(1000, ge=0)
    """Refuse an initial sync of more than this many memberships from a state that holds
    nothing for a destination that was synced before (``--initial`` overrides)."""
    destination_synced_before: bool = False
    """The operator's word that the destination was synced before, whatever it shows."""


class AlertConfig(_Strict):
    """``[alerts]``: who hears about a run that failed, went partial, was refused by a safeguard
    or ran out of quota, and an audience overdue (``serve``)."""

    webhook_url: str | None = Field(None, repr=False)  # a secret: prefer $AUDIENCE_SYNC_WEBHOOK_URL
    """A Slack-compatible incoming webhook: POSTed ``{"text": ...}``."""
    command: str | None = None
    """A program (split like a shell would, not run by one) given the event as JSON on stdin."""
    partial_failed_users: int = Field(1, ge=1)
    """A partial run alerts when at least this many users failed or were skipped."""
    timeout: Duration = timedelta(seconds=10)
    """How long the webhook or the command may take."""

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None or self.command is not None


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """``[destination]``: the kind, its name in the state tables, and its own validated settings."""

    type: str
    name: str
    settings: DestinationSettings


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. ``path`` is the file it came from."""

    path: Path
    state: StateConfig
    destination: DestinationConfig
    audiences: tuple[AudienceConfig, ...]
    service: ServiceConfig = field(default_factory=ServiceConfig)
    safeguards: SafeguardConfig = field(default_factory=SafeguardConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    @property
    def computed_traits(self) -> tuple[AudienceConfig, ...]:
        """The ``[[computed_traits]]`` among ``audiences`` (which holds every sync, in order)."""
        return tuple(a for a in self.audiences if a.computed)

    def select(self, names: Sequence[str]) -> tuple[AudienceConfig, ...]:
        """The audiences and computed traits named (by name or trait key), in config order;
        all when none given."""
        if not names:
            return self.audiences
        known = {a.name: a for a in self.audiences} | {a.trait_key: a for a in self.audiences}
        missing = [n for n in names if n not in known]
        if missing:
            listed = ", ".join(repr(a.name) for a in self.audiences)
            what = "audience or computed trait" if self.computed_traits else "audience"
            plural = "audiences and computed traits" if self.computed_traits else "audiences"
            raise ConfigError(
                f"{self.path}: no {what} named {', '.join(map(repr, missing))}; "
                f"configured {plural}: {listed}"
            )
        wanted = {known[n].trait_key for n in names}
        return tuple(a for a in self.audiences if a.trait_key in wanted)


def _location(loc: tuple[int | str, ...], raw: Mapping[str, Any]) -> str:
    """``("audiences", 1, "schedule")`` -> ``audiences[1].schedule (audience 'X')``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    nouns = {"audiences": "audience", "computed_traits": "computed trait"}
    if len(loc) >= 2 and loc[0] in nouns and isinstance(loc[1], int):
        entries = raw.get(str(loc[0]))
        if isinstance(entries, list) and loc[1] < len(entries):
            entry = entries[loc[1]]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                text += f" ({nouns[str(loc[0])]} {entry['name']!r})"
    return text


def _format(path: Path, exc: ValidationError, raw: Mapping[str, Any], prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = _location(tuple(err["loc"]), raw)
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the configuration reference)"
        elif err["type"] == "missing":
            msg = "missing required key"
        lines.append(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}")
    return "\n".join(lines)


class _Document(_Strict):
    state: StateConfig = StateConfig()
    destination: dict[str, Any]
    audiences: list[AudienceConfig] = []
    computed_traits: list[ComputedTraitConfig] = []
    service: ServiceConfig = ServiceConfig()
    safeguards: SafeguardConfig = SafeguardConfig()
    alerts: AlertConfig = AlertConfig()


def _destination(path: Path, table: Mapping[str, Any], env: Mapping[str, str]) -> DestinationConfig:
    kind = table.get("type")
    if kind is None:
        raise ConfigError(f"{path}: destination.type: missing required key (one of {kinds()})")
    try:
        cls = destination_class(str(kind))
    except KeyError:
        raise ConfigError(
            f"{path}: destination.type: unknown destination {kind!r}; choose one of {kinds()}"
        ) from None
    options = {k: v for k, v in table.items() if k not in ("type", "name")}
    try:
        settings = cls.settings_model.from_config(options, env)
    except ValidationError as exc:
        raise ConfigError(_format(path, exc, table, prefix="destination")) from None
    except ValueError as exc:  # a check that needs more than one key, e.g. env overrides
        raise ConfigError(f"{path}: destination.{exc}") from None
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{path}: destination.name: must be a non-empty string")
    return DestinationConfig(str(kind), name or cls.default_name(settings), settings)


def _check_audiences(path: Path, entries: Sequence[AudienceConfig]) -> tuple[AudienceConfig, ...]:
    """Names and trait keys unique across audiences and computed traits; sources resolved."""
    if not entries:
        raise ConfigError(
            f"{path}: no [[audiences]] or [[computed_traits]]: configure at least one "
            "(see config/audience-sync.toml for an example)"
        )
    seen: dict[str, AudienceConfig] = {}
    names: dict[str, AudienceConfig] = {}
    index = {"audiences": 0, "computed_traits": 0}
    resolved = []
    for entry in entries:
        i = index[entry.table]
        index[entry.table] += 1
        at = f"{path}: {entry.table}[{i}]"
        this = f"{entry.noun} {entry.name!r}"
        if entry.name in names:
            # `--audience NAME` and the run history address syncs by name.
            other = names[entry.name]
            also = "" if other.kind is entry.kind else f" (also by {other.noun} {other.name!r})"
            raise ConfigError(
                f"{at}.name: {entry.noun} name {entry.name!r} is used twice{also}; give each "
                "audience and computed trait its own name"
            )
        names[entry.name] = entry
        key = entry.trait_key
        if key in RESERVED_TRAIT_KEYS:
            raise ConfigError(
                f"{at} ({this}): trait key {key!r} is reserved: it is an identity trait and "
                f"would overwrite the user's {key} in the destination; give the {entry.noun} a "
                f'key of its own, e.g. key = "{key}_{entry.kind.value}"'
            )
        if key in seen:
            other = seen[key]
            raise ConfigError(
                f"{at} ({this}): trait key {key!r} is already used by {other.noun} "
                f"{other.name!r}; audiences and computed traits share one key namespace, so "
                "give one of them an explicit `key`"
            )
        seen[key] = entry
        if entry.source is not None:
            source = entry.source if entry.source.is_absolute() else path.parent / entry.source
            if not source.is_file() or not os.access(source, os.R_OK):
                why = "does not exist" if not source.exists() else "is not a readable file"
                raise ConfigError(f"{at}.source ({this}): {source} {why}")
            entry = entry.model_copy(update={"source": source})
        elif entry.source_url is not None:
            url = _resolve_sqlite(path, entry.source_url)
            entry = entry.model_copy(update={"source_url": url})
        resolved.append(entry)
    return tuple(resolved)


def load_config(
    path: str | Path = DEFAULT_CONFIG_PATH, *, env: Mapping[str, str] | None = None
) -> Config:
    """Read, validate and resolve the config at ``path``.

    ``[state] url`` is overridden by ``$AUDIENCE_SYNC_STATE_URL``; relative ``source`` paths and
    relative SQLite paths in ``[state] url`` and ``source_url`` are resolved against the config
    file's folder (a relative path in the environment variable stays relative to the working
    directory).
    """
    env = os.environ if env is None else env
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (pass --config PATH or create {DEFAULT_CONFIG_PATH})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file, so not TOML ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        doc = _Document.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(path, exc, raw)) from None
    state = doc.state
    if env.get(STATE_URL_ENV):
        state = state.model_copy(update={"url": env[STATE_URL_ENV]})
    else:
        state = state.model_copy(update={"url": _resolve_state_url(path, state.url)})
    if state.cache_dir is not None and not state.cache_dir.is_absolute():
        state = state.model_copy(update={"cache_dir": path.parent / state.cache_dir})
    return Config(
        path=path,
        state=state,
        destination=_destination(path, doc.destination, env),
        audiences=_check_audiences(path, [*doc.audiences, *doc.computed_traits]),
        service=_resolve_service(path, doc.service),
        safeguards=doc.safeguards,
        alerts=(
            doc.alerts.model_copy(update={"webhook_url": env[WEBHOOK_URL_ENV]})
            if env.get(WEBHOOK_URL_ENV)
            else doc.alerts
        ),
    )


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (as written: maybe relative); None for any other database,
    an in-memory one, or a URI filename."""
    from sqlalchemy.engine import make_url  # only here: the config module loads fast without it
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # reported when the state database is opened
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(database)


def _resolve_sqlite(path: Path, url: str) -> str:
    """A relative SQLite path in ``url`` made relative to the config file's folder."""
    from sqlalchemy.engine import make_url

    database = sqlite_path(url)
    if database is None or database.is_absolute():
        return url
    resolved = (path.parent / database).absolute()
    return make_url(url).set(database=str(resolved)).render_as_string(hide_password=False)


def _resolve_state_url(path: Path, url: str) -> str:
    """``[state] url`` with a relative SQLite path resolved against the config file's folder.

    Before 0.2 it was relative to the working directory, so a run from another folder made
    (and fully synced) a new empty database: when only that old location exists, stop.
    """
    resolved = _resolve_sqlite(path, url)
    database, new = sqlite_path(url), sqlite_path(resolved)
    if database is None or new is None or database.is_absolute():
        return resolved
    old = Path.cwd() / database
    if old.exists() and not new.exists():
        raise StateMissing(
            f"{path}: [state] url {url!r} is relative to the config file's folder since "
            f"audience-sync 0.2, so it means {new}, which does not exist; but {old} "
            "(the same path relative to the working directory, as before 0.2) does. Nothing "
            f"was run. Move the database next to the config (`mv {old} {new}`, with any "
            "-wal and -shm files beside it), or point url at it with an absolute path: "
            f'url = "sqlite:///{old}"'
        )
    return resolved


def _resolve_service(path: Path, service: ServiceConfig) -> ServiceConfig:
    textfile = service.metrics_textfile
    if textfile is not None and not textfile.is_absolute():
        return service.model_copy(update={"metrics_textfile": path.parent / textfile})
    return service
