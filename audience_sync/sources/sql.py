"""Run an audience's SQL query on any SQLAlchemy database and return its rows as text columns.

The result never exists whole as Python objects. On PostgreSQL, when every column validation
reads has a type whose Arrow form matches (text, integers, ...), ADBC's driver decodes it into
Arrow record batches in C. Otherwise the rows are streamed (``stream_results``: a server-side
cursor where the driver has one) and converted a chunk at a time into Arrow arrays, so only one
chunk of Python rows is alive at once. Each chunk is typed by pandas' own SQL conversion, and a
value becomes the same text as when the whole result was read by ``read_sql_query`` (kept as
the reference in ``tests/sources/test_sql_stream.py``, which asserts the same snapshots).
Columns validation never reads (neither ``user_id``, an identity trait, ``snapshot_at`` nor the
computed trait's values) keep only their name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from audience_sync.drivers import url_error
from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS
from audience_sync.sources.freshness import SNAPSHOT_AT_COLUMN

__all__ = ["CHUNK_ROWS", "query_header", "read_query", "wrappable"]

#: Rows fetched and converted at a time: a chunk's Python objects are the only ones alive.
CHUNK_ROWS = 50_000


def read_query(
    url: str, query: str, *, keep: str | None = None, chunk_rows: int = CHUNK_ROWS
) -> pd.DataFrame:
    """The rows ``query`` selects at ``url``; errors never show the URL's password.

    ``keep``: a column left with its own type (a computed trait's values), not made text.
    ``chunk_rows``: rows fetched and converted at a time where the driver has no Arrow path.
    """
    engine = _engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        if engine.url.get_backend_name() == "postgresql":
            found = _read_adbc(engine.url, query, keep)
            if found is not None:
                return _frame(*found, keep=keep, where=where)
        # Rows read off the DBAPI cursor raise the driver's own errors (one failing mid-result).
        driver_error = getattr(engine.dialect.loaded_dbapi, "Error", sa.exc.SQLAlchemyError)
        try:
            names, columns, rows = _read_chunks(engine, query, keep, chunk_rows)
        except (sa.exc.SQLAlchemyError, driver_error) as exc:
            raise _failed(where, exc) from None
    finally:
        engine.dispose()
    unified = {i: _unified(chunks) for i, chunks in columns.items()}
    if any(column is None for column in unified.values()):
        return _read_whole(url, query, keep)
    return _frame(names, unified, rows, keep=keep, where=where)


def _used(name: str, keep: str | None) -> bool:
    """Whether validation reads the column's values (else only its name matters)."""
    return name.strip() in {"user_id", SNAPSHOT_AT_COLUMN, *IDENTITY_TRAITS, keep}


#: PostgreSQL types whose Arrow form through ADBC is the one pandas gives psycopg's values, so
#: the same text and canonical values follow (``numeric`` is Arrow text there, a Decimal
#: here; ``real`` a float32; ``char(n)``, timestamps and the rest are read in chunks).
_ADBC_TYPES = frozenset({"text", "varchar", "int2", "int4", "int8", "float8", "bool", "date"})


def _read_adbc(
    url: sa.URL, query: str, keep: str | None
) -> tuple[list[str], dict[int, pa.ChunkedArray | None], int] | None:
    """The used columns read through ADBC's PostgreSQL driver (binary ``COPY`` decoded into
    Arrow record batches in C, no Python object per value), or None to read in chunks: ADBC is
    not installed, a used column has another type, or anything failed (the chunked read then
    fails with the usual message, or succeeds). Nothing is committed: a statement that is not
    a SELECT is rolled back, as it is by the chunked read."""
    try:
        import adbc_driver_postgresql.dbapi as adbc
    except ImportError:
        return None
    # libpq takes the same URL as psycopg without SQLAlchemy's "+driver" suffix.
    uri = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with adbc.connect(uri) as conn, conn.cursor() as cursor:
            cursor.execute(query)
            reader = cursor.fetch_record_batch()
            names = list(reader.schema.names)
            used = [i for i, name in enumerate(names) if _used(name, keep)]
            for i in used:
                field = reader.schema.field(i)
                if (field.metadata or {}).get(b"POSTGRESQL:type", b"").decode() not in _ADBC_TYPES:
                    return None
            if not names:
                return None
            columns: dict[int, list[pa.Array]] = {i: [] for i in used}
            rows = 0
            for batch in reader:  # a batch at a time: the unused columns are dropped as read
                for i in used:
                    columns[i].append(batch.column(i))
                rows += batch.num_rows
    except (adbc.Error, pa.ArrowException, OSError):  # a failure mid-result is Arrow's error
        return None
    typed: dict[int, pa.ChunkedArray | None] = {}
    for i, chunks in columns.items():
        column = pa.chunked_array(chunks, reader.schema.field(i).type)
        # pandas types a column of NULLs only as text, whatever the database's type.
        typed[i] = column.cast(pa.string()) if column.null_count == len(column) else column
    return names, typed, rows


def _read_chunks(
    engine: sa.Engine, query: str, keep: str | None, chunk_rows: int
) -> tuple[list[str], dict[int, list[pa.Array]], int]:
    """The column names, the used columns' chunks typed by pandas, and the row count.

    The DBAPI cursor's rows are read directly (a ``text()`` query has no result processing to
    skip): SQLAlchemy's ``Row`` per row cost more than the whole read used to. Each chunk goes
    through pandas' own conversion for ``read_sql_query`` (a private function: the property
    test compares with ``read_sql_query`` itself, so a pandas change would show there).
    """
    from pandas.io.sql import _wrap_result  # type: ignore[attr-defined]

    columns: dict[int, list[pa.Array]] = {}
    rows = 0
    with engine.connect() as conn:
        streamed = conn.execution_options(stream_results=True, yield_per=chunk_rows)
        with streamed.execute(sa.text(query)) as result:
            if not result.returns_rows:
                result.fetchone()  # raises SQLAlchemy's "does not return rows"
            names = list(map(str, result.keys()))
            columns = {i: [] for i, name in enumerate(names) if _used(name, keep)}
            cursor = result.cursor
            # SQLAlchemy may have buffered rows ahead of the cursor (a server-side cursor's
            # first row): its first chunk empties that buffer, and anything it still held at
            # the end is read last, so no row is ever skipped.
            batch: Sequence[Any] = result.fetchmany(chunk_rows)
            while True:
                if batch or not rows:  # an empty result still has its columns' types
                    frame = _wrap_result(batch, names, dtype_backend="pyarrow")
                    for i, chunks in columns.items():
                        chunks.append(pa.array(frame.iloc[:, i].array))
                    rows += len(batch)
                if len(batch) < chunk_rows or result.closed:
                    batch = result.fetchall()
                    if not batch:
                        break
                else:
                    batch = cursor.fetchmany(chunk_rows)
    return names, columns, rows


def _frame(
    names: list[str],
    columns: dict[int, pa.ChunkedArray | None],
    rows: int,
    *,
    keep: str | None,
    where: str,
) -> pd.DataFrame:
    """The frame validation takes: used columns as text (``keep`` typed), others only named."""
    data: dict[str, pd.Series] = {}
    for i, name in enumerate(names):
        typed = columns.get(i)
        if typed is None:
            # Only the name matters (messages): nothing of the column is kept.
            data[str(i)] = _series(pa.nulls(rows, pa.large_string())).astype("string[pyarrow]")
            continue
        column = _series(typed)
        if name.strip() == "user_id":
            _refuse_float_ids(column, where)
        if name.strip() != keep or keep in IDENTITY_TRAITS:
            # Integers become text without a decimal point; everything else as its text form.
            column = column.astype("string[pyarrow]")
        data[str(i)] = column
    frame = pd.DataFrame(data, index=pd.RangeIndex(rows))
    # A repeated column name stays repeated, so validation reports it.
    frame.columns = pd.Index(names)
    return frame


def _read_whole(url: str, query: str, keep: str | None) -> pd.DataFrame:
    """The rows read as one result (all Python objects at once), for the rare column whose
    chunks alone cannot be typed as the whole column is."""
    engine = _engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            frame = pd.read_sql_query(sa.text(query), conn, dtype_backend="pyarrow")
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:
        raise _failed(where, exc) from None
    finally:
        engine.dispose()
    _refuse_float_ids(frame.get("user_id"), where)
    text = [c for c in frame.columns if str(c).strip() != keep or keep in IDENTITY_TRAITS]
    return frame.astype(dict.fromkeys(text, "string[pyarrow]"))


def _refuse_float_ids(user_id: pd.Series | None, where: str) -> None:
    if user_id is not None and pd.api.types.is_float_dtype(user_id.dtype):
        raise SnapshotError(
            f"query on {where}: column `user_id` is a floating-point number, which would turn "
            "7 into '7.0'; select it as text or an integer (e.g. CAST(... AS INTEGER))"
        )


def _series(array: pa.Array | pa.ChunkedArray) -> pd.Series:
    return pd.Series(pd.arrays.ArrowExtensionArray(array))


def _unified(chunks: list[pa.Array]) -> pa.ChunkedArray | None:
    """One column of the chunks' arrays, typed as ``read_sql_query`` types the whole column.

    A column has one type in most databases. SQLite's values each have their own (an untyped
    column, or text in an INTEGER column): pandas reads integers mixed with floats as floats
    (``1`` is ``1.0``), and any mix with text as the text of each value, which each chunk's
    own text already is. The whole column's type is that of its values, as it is for pandas.
    None: only a read of the whole result types the column as pandas does (numbers and text
    mixed in an untyped SQLite column).
    """
    # A chunk of NULLs only has whatever type pandas gives no values (text): it says nothing.
    kinds = {c.type for c in chunks if c.null_count < len(c)}
    if not kinds:
        kinds = {chunks[0].type}
    if len(kinds) == 1:
        (kind,) = kinds
        return pa.chunked_array([c.cast(kind) for c in chunks], kind)
    if all(pa.types.is_integer(k) or pa.types.is_floating(k) for k in kinds):
        return pa.chunked_array([c.cast(pa.float64()) for c in chunks], pa.float64())
    if any(pa.types.is_floating(k) for k in kinds):
        # A float chunk may hold integers pandas made floats, which the text of the whole
        # column would write without the ".0": only the whole result can say.
        return None
    text = [pa.array(_series(c).astype("string[pyarrow]").array) for c in chunks]
    return pa.chunked_array([c.cast(pa.large_string()) for c in text], pa.large_string())


def query_header(url: str, query: str) -> tuple[list[str], int]:
    """The column names and row count ``query`` would give, counted by the database (the rows
    are not fetched)."""
    engine = _engine(url)
    where = engine.url.render_as_string(hide_password=True)
    inner = wrappable(query)
    try:
        with engine.connect() as conn:
            empty = conn.execute(sa.text(f"SELECT * FROM ({inner}\n) AS snapshot WHERE 1 = 0"))
            columns = list(empty.keys())
            empty.close()
            rows = conn.execute(sa.text(f"SELECT count(*) FROM ({inner}\n) AS snapshot")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        raise _failed(where, exc) from None
    finally:
        engine.dispose()
    return columns, int(rows or 0)


def wrappable(query: str) -> str:
    """``query`` ready to be wrapped as ``({query}\n)``: its trailing semicolons removed.

    Semicolons inside quotes or comments stay; the caller's newline before the closing
    parenthesis ends a trailing ``-- comment``, which would otherwise swallow it.
    """
    end = len(query)
    i = last_code = 0
    semicolons: list[int] = []
    while i < end:
        if query[i] in "'\"":  # a doubled quote inside reads as two adjacent strings
            close = query.find(query[i], i + 1)
            i = end if close < 0 else close + 1
            last_code = i
            continue
        if query.startswith("--", i):
            close = query.find("\n", i)
            i = end if close < 0 else close + 1
            continue
        if query.startswith("/*", i):
            close = query.find("*/", i + 2)
            i = end if close < 0 else close + 2
            continue
        if query[i] == ";":
            semicolons.append(i)
        elif not query[i].isspace():
            last_code = i + 1
        i += 1
    trailing = {s for s in semicolons if s >= last_code}
    return "".join(c for i, c in enumerate(query) if i not in trailing).strip()


def _engine(url: str) -> sa.Engine:
    try:
        return sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise SnapshotError(url_error("source_url", exc)) from None


def _failed(where: str, exc: Exception) -> SnapshotError:
    # pandas wraps a failed statement in its own DatabaseError, the SQLAlchemy one as cause.
    cause = exc.__cause__ if isinstance(exc.__cause__, sa.exc.SQLAlchemyError) else exc
    detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
    return SnapshotError(f"query on {where} failed: {detail}")
