"""The member cache: a columnar copy of each audience's confirmed members, beside the state.

A run whose snapshot changed must diff it against the members the state holds; reading them
from the database is most of a small incremental run's cost (issue 14). So a run that may leave
the state exactly equal to its snapshot writes the snapshot's member ids to a file here (Arrow
IPC, one ``user_id`` column), and when it does leave the state so, the fingerprint row it
records (``state/fingerprints.py``) names the file by the BLAKE3 digest of its bytes. The next
run reads the fingerprint row before its own run row deletes it; if the file with those bytes
is here, it holds exactly the state's members, and the run diffs against it instead of reading
the database.

SQL stays the source of truth: the row is deleted whenever any run of the audience starts, a
file is trusted only if its bytes hash to the digest the row names, and its row count must be
the row's ``members``. A file missing, stale (another run's), truncated or edited, or a folder
that belongs to another host or a restored database, is only a cache miss: the run reads the
database, as it would without the cache, and says why in the log. Deleting the folder at any
time changes no result.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import blake3
import pandas as pd
import pyarrow as pa

from audience_sync.arrowtext import arrow_text

__all__ = ["MemberCache"]

log = logging.getLogger(__name__)

_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False)])


class MemberCache:
    """The cache's folder: a file per audience, ``audience-<id>-blake3-<digest>.arrow``.

    Files named ``audience-<id>-<digest>.arrow`` hold BLAKE2b digests (before BLAKE3, which
    hashes the same bytes 5x faster): their rows find no file of the new name, a cache miss
    said as such, and the audience's next run prunes them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, audience_id: int, digest: str, members: int) -> pd.Index | None:
        """The members in the file the state's fingerprint row names (``digest``, ``members``
        ids), or None (and why, in the log) when no such file is here."""
        path = self.path(audience_id, digest)
        try:
            # Into Arrow's memory, which goes back to the system when freed. Read as Python
            # bytes on the thread that reads the state, each audience's ids stayed in that
            # thread's malloc arena after they were freed (4M memberships: 8 MB more with
            # each audience of 500,000).
            with pa.OSFile(str(path)) as file:
                data = file.read_buffer()
        except FileNotFoundError:
            log.info(
                "audience_id=%d member cache %s not found: reading the members from the state",
                audience_id,
                path,
            )
            return None
        except OSError as exc:
            _miss(audience_id, path, f"cannot be read ({exc.strerror or exc})")
            return None
        if _digest(data) != digest:
            _miss(audience_id, path, "does not hold what the state recorded")
            return None
        try:
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        except (pa.ArrowException, OSError) as exc:
            _miss(audience_id, path, f"is not a member cache ({exc})")
            return None
        if not table.schema.equals(_SCHEMA) or table.num_rows != members:
            _miss(audience_id, path, f"holds {table.num_rows:,} ids, not {members:,}")
            return None
        # The chunks as written: the diff and pandas take chunked ids as they are.
        ids = table.column("user_id")
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index

    def write(self, audience_id: int, ids: pd.Index) -> str | None:
        """Write ``ids`` as the audience's cache file; its digest, or None when the folder
        cannot be written (logged: the runs go on reading the members from the state)."""
        column = arrow_text(ids)
        # A record batch per chunk (a snapshot read from Parquet comes in one per row group):
        # joining them first copied every id, and each chunk's cast rewrites only offsets.
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        table = pa.Table.from_batches(
            [pa.record_batch([chunk.cast(pa.string())], schema=_SCHEMA) for chunk in chunks],
            schema=_SCHEMA,
        )
        # Uncompressed: 2 ms for 500,000 ids where zstd takes 48 ms, and read without a copy.
        # Into a buffer of the file's size, measured first: a growing one was reallocated and
        # copied at each doubling, fresh pages each time (2.5M ids: 0.02 s of CPU instead of
        # 0.06-0.4 s).
        size = pa.MockOutputStream()
        _write_ipc(size, table)
        data = pa.allocate_buffer(size.size())
        _write_ipc(pa.FixedSizeBufferWriter(data), table)
        digest = _digest(data)
        path = self.path(audience_id, digest)
        try:
            # The ids are customer data: the folder is the owner's only.
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Written whole under another name, then renamed: a reader sees all of it or none
            # (and a torn file would not hash to its digest anyway).
            fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".writing-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning(
                "audience_id=%d member cache not written to %s (%s): the next run reads the "
                "members from the state",
                audience_id,
                self.folder,
                exc.strerror or exc,
            )
            return None
        self.prune(audience_id, keep=path)
        return digest

    def prune(self, audience_id: int, keep: Path | None = None) -> None:
        """Remove the audience's files but ``keep``: once a run of it has started (and so
        deleted the row naming one), no other file of it can be used again."""
        for path in self.folder.glob(f"audience-{audience_id}-*.arrow"):
            if path != keep:
                path.unlink(missing_ok=True)

    def path(self, audience_id: int, digest: str) -> Path:
        """The file of ``audience_id``'s members whose bytes have ``digest``."""
        return self.folder / f"audience-{audience_id}-blake3-{digest}.arrow"


def _write_ipc(sink: pa.NativeFile, table: pa.Table) -> None:
    with pa.ipc.new_file(sink, _SCHEMA) as writer:
        writer.write_table(table)


def _digest(data: pa.Buffer | bytes) -> str:
    return blake3.blake3(memoryview(data)).hexdigest()


def _miss(audience_id: int, path: Path, why: str) -> None:
    log.warning(
        "audience_id=%d member cache %s %s: reading the members from the state",
        audience_id,
        path,
        why,
    )
