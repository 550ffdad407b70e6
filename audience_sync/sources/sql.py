"""Run an audience's SQL query on any SQLAlchemy database and return its rows as text columns."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from audience_sync.drivers import url_error
from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS

__all__ = ["query_header", "read_query", "wrappable"]


def read_query(url: str, query: str, *, keep: str | None = None) -> pd.DataFrame:
    """The rows ``query`` selects at ``url``; errors never show the URL's password.

    ``keep``: a column left with its own type (a computed trait's values), not made text.
    """
    engine = _engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            frame = pd.read_sql_query(sa.text(query), conn, dtype_backend="pyarrow")
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:
        raise _failed(where, exc) from None
    finally:
        engine.dispose()
    user_id = frame.get("user_id")
    if user_id is not None and pd.api.types.is_float_dtype(user_id):
        raise SnapshotError(
            f"query on {where}: column `user_id` is a floating-point number, which would turn "
            "7 into '7.0'; select it as text or an integer (e.g. CAST(... AS INTEGER))"
        )
    # Integers become text without a decimal point; everything else as its text form.
    text = [c for c in frame.columns if str(c).strip() != keep or keep in IDENTITY_TRAITS]
    return frame.astype(dict.fromkeys(text, "string[pyarrow]"))


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
