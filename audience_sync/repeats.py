"""Whether user ids repeat: a check over ids that no stage owns, used by validation
(``sources/validate.py``, a snapshot's rows) and by the tests of the diff (which takes unique
ids)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_sync.arrowtext import arrow_text

__all__ = ["has_repeated"]


def has_repeated(ids: pd.Index | pd.Series) -> bool:
    """Whether any id occurs twice.

    Ids in strictly increasing (byte) order repeat none: comparing each with the next, 20 ms
    for 1M ids, answers for a sorted export (a query's ``ORDER BY``, most files) without a
    hash. Otherwise a DuckDB ``GROUP BY`` over the Arrow buffers: 0.17 s for 2.5M ids on two
    quiet cores, where Arrow's ``unique`` takes 0.6 s and pandas' ``duplicated`` several seconds.
    """
    if len(ids) < 2:
        return False
    text = arrow_text(ids)
    # A null compares as null, and then ``all`` is not True: the hash decides.
    if pc.all(pc.less(text[:-1], text[1:]), skip_nulls=False).as_py() is True:
        return False
    table = pa.table({"u": text})
    import duckdb  # imported when used: a run with nothing to diff never loads it

    with duckdb.connect(":memory:") as con:
        con.register("ids", table)
        # Equal ids hash alike, so ids whose 64-bit hashes are all distinct repeat none; grouping
        # integers is 40% faster than grouping the text. A shared hash is a repeat or (rarely)
        # a collision: the ids themselves decide.
        for key in ("hash(u)", "u"):
            query = f"SELECT 1 AS found FROM ids GROUP BY {key} HAVING count(*) > 1 LIMIT 1"
            if len(con.sql(query).fetchnumpy()["found"]) == 0:
                return False
        return True
