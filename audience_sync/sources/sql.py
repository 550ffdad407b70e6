"""Run an audience's SQL query on any SQLAlchemy database and return its rows as text columns."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from audience_sync.errors import SnapshotError

__all__ = ["read_query"]


def read_query(url: str, query: str) -> pd.DataFrame:
    """The rows ``query`` selects at ``url``; errors never show the URL's password."""
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise SnapshotError(f"source_url is not a usable SQLAlchemy URL: {exc}") from None
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            frame = pd.read_sql_query(sa.text(query), conn, dtype_backend="pyarrow")
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SnapshotError(f"query on {where} failed: {detail}") from None
    finally:
        engine.dispose()
    # Integers become text without a decimal point; everything else as its text form.
    return frame.astype("string[pyarrow]")
