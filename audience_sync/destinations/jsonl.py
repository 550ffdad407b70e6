"""A destination that needs no credentials: Segment-spec Identify messages, one JSON per line.

Each audience change becomes one Identify (as Engage sends them), appended to a file and
``fsync``-ed before its batch is confirmed, so the state never runs ahead of the file. Useful
for trying audience-sync out, and as a hand-off to any tool that reads Segment messages.

The file takes whole batches, so this is a ``deliver_batches`` destination: a batch's lines are
rendered by one DuckDB query over its Arrow table (JSON escaping in C, on all cores) and written
straight from the result's buffer, with no Python object per message.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

import orjson
from pydantic import Field

from audience_sync.destinations.base import Call, Destination, DestinationSettings, IdentifyCall
from audience_sync.errors import DestinationError
from audience_sync.model import IDENTITY_TRAITS, ChangeBatch, Outcome
from audience_sync.scratch import scratch

if TYPE_CHECKING:  # loaded by the first batch: a config naming this destination costs nothing
    import duckdb
    import pyarrow as pa

__all__ = ["JsonlDestination", "JsonlSettings", "identify_lines"]


class JsonlSettings(DestinationSettings):
    path: Path = Path("out/identify.jsonl")
    """Output file, relative to the config file's folder; appended to."""
    space_id: str = "audience-sync"
    """Written as ``context.personas.space_id`` (Segment's Engage space)."""
    flush_every: int = Field(default=20_000, ge=1)
    """Users written between two ``fsync`` calls (each confirms that many users).

    Each confirmed block is one state commit (a statement per audience and table, and an
    ``fsync`` each side): 20,000 (~9 MB of JSON) made the 400,000 changes of a 20M-membership
    run 0.5-0.9 s of CPU cheaper than 5,000 did (80 blocks of 8 audiences; docs/scale.md); a
    crash re-writes at most two blocks (three on PostgreSQL)."""
    fsync: bool = True


@functools.cache
def computation_id(audience_key: str, computation_class: str = "audience") -> str:
    """A stable id for the audience (or computed trait) in ``context.personas``: Segment uses
    ``aud_...`` ids for audiences and ``tra_...`` for computed traits."""
    prefix = "tra_" if computation_class == "trait" else "aud_"
    return prefix + hashlib.sha1(audience_key.encode()).hexdigest()[:24]


def identify_lines(
    batch: ChangeBatch, *, space_id: str, timestamp: str, con: duckdb.DuckDBPyConnection
) -> pa.ChunkedArray:
    """The Segment Identify that Engage would send for each change of ``batch``, one JSON text
    per change, each ending in a newline (so the column's buffer is the file's bytes).

    ``traits`` holds the user's known identity traits and the audience's trait (a computed
    trait's value, ``null`` when cleared); ``context`` says which audience or computed trait
    (computation) it came from, as Engage's ``context.personas`` does.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = batch.table
    keys = table.column("audience_key").combine_chunks()
    audiences = keys.dictionary.to_pylist()
    # Per audience, not per change: the JSON of its trait key and of its context. The trait
    # column holds the key's JSON string ('"vip"'); the query writes ':' and the value after it
    # (':true' or ':false', or a computed trait's JSON from `data`, which audiences' rows lack).
    data = table.column("data")
    computed = set(pc.unique(keys.indices.filter(data.is_valid())).to_pylist())
    trait = pa.array([orjson.dumps(k).decode() for k in audiences], pa.string())
    context = pa.array(
        [
            orjson.dumps(_context(k, space_id, "trait" if i in computed else "audience")).decode()
            for i, k in enumerate(audiences)
        ],
        pa.string(),
    )
    columns: dict[str, Any] = {
        "user_id": table.column("user_id"),
        "value": table.column("value"),
        "data": data,
        "message_id": table.column("message_id"),
        "trait": trait.take(keys.indices),
        "context": context.take(keys.indices),
    }
    for name in IDENTITY_TRAITS:
        values = table.column(name)
        if name in audiences:  # an audience whose key is `email` (say): its value wins
            values = pc.if_else(pc.equal(keys.indices, audiences.index(name)), None, values)
        columns[name] = values
    con.register("batch", pa.table(columns))
    try:
        return con.sql(_IDENTIFY_SQL, params=[_tail(timestamp)]).to_arrow_table().column("line")
    finally:
        con.unregister("batch")


# `concat` skips NULL arguments and `'"email":' || NULL` is NULL: unknown traits are left out.
_IDENTIFY_SQL = (
    """SELECT concat('{"type":"identify","userId":', to_json(user_id), ',"traits":{', """
    + ", ".join(f"""'"{t}":' || to_json({t}) || ','""" for t in IDENTITY_TRAITS)
    + """, trait, CASE WHEN data IS NOT NULL THEN ':' || data WHEN value THEN ':true' """
    + """ELSE ':false' END, '},"context":', context, """
    + """',"messageId":', to_json(message_id), $1) AS line FROM batch"""
)


def _tail(timestamp: str) -> str:
    """The end of every line of a run: its timestamp and the integrations."""
    # orjson writes '{"timestamp":"...","integrations":{...}}'. Without its opening brace, the
    # text's last brace closes the message that _IDENTIFY_SQL opened with '{"type":"identify"',
    # and the comma put in front follows the messageId's value: every line ends
    # ...,"messageId":"...","timestamp":"...","integrations":{...}}\n. Built once per run and
    # appended by the query as $1, so no line is parsed or re-serialised.
    end = orjson.dumps({"timestamp": timestamp, "integrations": _INTEGRATIONS}).decode()
    return "," + end[1:] + "\n"


_INTEGRATIONS: dict[str, bool] = {"All": False, "Crisp": True}


@functools.cache
def _context(
    audience_key: str, space_id: str, computation_class: str = "audience"
) -> dict[str, Any]:
    # The same for every message of an audience: built once, not 100,000s of times. Plain
    # dicts (orjson serialises no read-only mapping type), so nothing may modify them.
    personas = {
        "computation_class": computation_class,
        "computation_key": audience_key,
        "computation_id": computation_id(audience_key, computation_class),
        "space_id": space_id,
        "namespace": f"spa_{space_id}",
    }
    return {"personas": personas}


def encode_line(message: dict[str, Any]) -> bytes:
    # orjson: about 8x the standard library's encoder, which matters at 100,000s of messages.
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def _bytes_of(text: pa.Array) -> memoryview:
    """The bytes of all of a string array's values, back to back (its data buffer's span)."""
    from audience_sync.arrowtext import text_buffers

    offsets, data = text_buffers(text)
    return memoryview(data[int(offsets[0]) : int(offsets[-1])].data)


def _drop_torn_line(path: Path) -> None:
    """Cut a partial last line left by a process killed mid-write.

    Its user was never confirmed (confirmation follows the fsync), so the next run re-sends it.
    """
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline; keep everything up to it.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


class JsonlDestination(Destination):
    kind = "jsonl"
    settings_model = JsonlSettings
    takes_batches = True
    settings: JsonlSettings
    _file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        path = self.settings.path
        return path if path.is_absolute() else self.config_dir / path

    async def __aenter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_line(self.path)
            self._file = self.path.open("ab")
        except OSError as exc:
            raise DestinationError(f"cannot open {self.path} for writing: {exc.strerror}") from None
        return self

    async def probe(self) -> str:
        # Nothing is created: the nearest folder that exists must let the run create the rest.
        folder = next(p for p in (self.path.parent, *self.path.parents) if p.exists())
        target = self.path if self.path.exists() else folder
        if not os.access(target, os.W_OK) or not (target.is_dir() or target == self.path):
            raise DestinationError(f"cannot write {self.path}: {target} is not writable")
        later = "" if folder == self.path.parent else f" ({self.path.parent} will be created)"
        return f"{self.path} is writable{later}"

    async def __aexit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _durable(self) -> None:
        """Flush to the OS and to disk: a confirmed outcome must survive a crash."""
        assert self._file is not None
        self._file.flush()
        if self.settings.fsync:
            os.fsync(self._file.fileno())

    def _write(self, lines: Sequence[bytes | memoryview]) -> None:
        assert self._file is not None, "use the destination as an async context manager"
        try:
            self._file.writelines(lines)
            self._durable()
        except OSError as exc:
            raise DestinationError(f"cannot write to {self.path}: {exc.strerror}") from None

    @property
    def batch_users(self) -> int:
        return self.settings.flush_every

    def previous_sync(self) -> str | None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return None
        return f"{self.path} holds {size:,} bytes of earlier messages" if size else None

    async def pace(self, n: int) -> None:
        """Called before the ``n``-th user (from 0) when a subclass overrides it (tests slow
        delivery down this way); the plain destination skips the call."""

    async def deliver_batches(
        self, batches: Iterable[ChangeBatch]
    ) -> AsyncGenerator[ChangeBatch, None]:
        timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        paced = type(self).pace is not JsonlDestination.pace
        users = 0
        with scratch() as con:
            for batch in batches:
                if paced:
                    for n in range(users, users + batch.users):
                        await self.pace(n)
                users += batch.users
                lines = identify_lines(
                    batch, space_id=self.settings.space_id, timestamp=timestamp, con=con
                )
                self._write([_bytes_of(chunk) for chunk in lines.chunks])
                yield batch

    async def send_calls(self, calls: Sequence[Call]) -> list[Outcome]:
        timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        lines, outcomes = [], []
        for call in calls:
            message: dict[str, Any]
            if isinstance(call, IdentifyCall):
                message = {"type": "identify", "userId": call.user_id, "traits": call.traits}
            else:
                message = {
                    "type": "track",
                    "userId": call.user_id,
                    "event": call.event,
                    "properties": call.properties,
                }
                if call.email is not None:
                    message["context"] = {"traits": {"email": call.email}}
            message |= {
                "messageId": str(uuid.uuid4()),
                "timestamp": timestamp,
                "integrations": _INTEGRATIONS,
            }
            lines.append(encode_line(message))
            outcomes.append(Outcome.delivered(call.user_id))
        self._write(lines)
        return outcomes
