"""Run an audience's SQL query on any SQLAlchemy database and return its rows as text columns."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from audience_sync.drivers import url_error
from audience_sync.errors import SnapshotError

__all__ = ["read_query"]


def read_query(url: str, query: str) -> pd.DataFrame:
    """The rows ``query`` selects at ``url``; errors never show the URL's password."""
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise SnapshotError(url_error("source_url", exc)) from None
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            frame = pd.read_sql_query(sa.text(query), conn, dtype_backend="pyarrow")
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:
        # pandas wraps a failed statement in its own DatabaseError, the SQLAlchemy one as cause.
        cause = exc.__cause__ if isinstance(exc.__cause__, sa.exc.SQLAlchemyError) else exc
        detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        raise SnapshotError(f"query on {where} failed: {detail}") from None
    finally:
        engine.dispose()
    user_id = frame.get("user_id")
    if user_id is not None and pd.api.types.is_float_dtype(user_id):
        raise SnapshotError(
            f"query on {where}: column `user_id` is a floating-point number, which would turn "
            "7 into '7.0'; select it as text or an integer (e.g. CAST(... AS INTEGER))"
        )
    # Integers become text without a decimal point; everything else as its text form.
    return frame.astype("string[pyarrow]")
