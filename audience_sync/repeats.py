"""Whether user ids repeat: a check over ids that no stage owns, used both by validation
(``sources/validate.py``, a snapshot's rows) and by the diff (``diff.members_repeat``)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from audience_sync.arrowtext import arrow_text

__all__ = ["has_repeated"]


def has_repeated(ids: pd.Index | pd.Series) -> bool:
    """Whether any id occurs twice.

    A DuckDB ``GROUP BY`` over the Arrow buffers: 0.17 s for 2.5M ids on two cores, where
    Arrow's ``unique`` takes 0.6 s and pandas' ``duplicated`` several seconds.
    """
    if len(ids) < 2:
        return False
    table = pa.table({"u": arrow_text(ids)})
    import duckdb  # imported when used: a run with nothing to diff never loads it

    with duckdb.connect(":memory:") as con:
        con.register("ids", table)
        found = con.sql("SELECT 1 AS found FROM ids GROUP BY u HAVING count(*) > 1 LIMIT 1")
        return len(found.fetchnumpy()["found"]) > 0
