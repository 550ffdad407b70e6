"""A computed trait's values in their canonical form: the JSON text the state keeps and compares.

Equality is by value, not by spelling: ``112`` and ``112.0`` in a CSV, a Parquet float ``112.0``
and an integer ``112`` are all the number ``112``; ``TRUE`` is ``true``. Each value becomes the
shortest JSON text of its typed value, so the diff compares text and a column whose type changes
between runs (text one day, float the next) re-sends nobody whose value is the same.

- Text (CSV, or a text column anywhere) is typed by its look with ``type = "auto"``:
  ``true``/``false`` (any case) are booleans, decimal numbers (``12``, ``-3.5``, ``1e3``) are
  numbers, anything else is a string. Surrounding blanks are stripped first and a blank value
  is no value. ``type = "string"`` keeps text as it is (zip codes: ``"01234"``), ``"number"``,
  ``"boolean"`` and ``"date"`` require that type.
- Typed columns (Parquet, SQL) keep their type: booleans, integers and floats as numbers,
  dates as ``YYYY-MM-DD`` and timestamps as ISO 8601 (``2024-05-01T10:00:00``, with ``Z`` after
  conversion to UTC when the column has a time zone).
- Integral numbers are written without a fraction (up to 2**53, where a float is still exact);
  NaN and infinities are refused, as are values Crisp cannot store (lists, structs, binary).

The work is one DuckDB query over the column's Arrow buffers: a Python loop costs seconds at
millions of rows.
"""

from __future__ import annotations

import pyarrow as pa

from audience_sync.errors import SnapshotError

__all__ = ["canonical_values"]

#: Decimal numbers as people and exports write them; DuckDB's own casts accept more (``0x10``,
#: ``1_000``) and round ``'1.5'`` to an integer, so text is matched first.
_INTEGER = r"^[+-]?[0-9]+$"
_DECIMAL = r"^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$"
_NOT_FINITE = r"^[+-]?(nan|inf|infinity)$"
_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_TIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]"
_ZONED = r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)$"

# A finite double as JSON: integral ones (exact below 2**53) as integers, others as DuckDB's
# shortest round-trip text ("0.1", "1.5e-07", "1e+20": all valid JSON numbers).
_NUMBER = (
    "CASE WHEN {d} = trunc({d}) AND abs({d}) < 9007199254740992 "
    "THEN CAST(CAST({d} AS BIGINT) AS VARCHAR) ELSE CAST({d} AS VARCHAR) END"
)
_TIMESTAMP = (
    "CASE WHEN microsecond({t}) % 1000000 = 0 THEN strftime({t}, '%Y-%m-%dT%H:%M:%S') "
    "ELSE strftime({t}, '%Y-%m-%dT%H:%M:%S.%f') END"
)


def _number(expr: str) -> str:
    return _NUMBER.format(d=f"({expr})")


def _text_sql(value_type: str) -> tuple[str, str]:
    """``(value, problem)`` expressions over ``v``, a stripped text value (NULL: none)."""
    number = (
        f"CASE WHEN regexp_matches(v, '{_INTEGER}') AND TRY_CAST(v AS BIGINT) IS NOT NULL "
        f"THEN CAST(CAST(v AS BIGINT) AS VARCHAR) "
        f"WHEN regexp_matches(v, '{_DECIMAL}') THEN {_number('CAST(v AS DOUBLE)')} END"
    )
    not_finite = f"regexp_matches(lower(v), '{_NOT_FINITE}')"
    boolean = (
        "CASE WHEN lower(v) IN ('true', 'false') THEN lower(v) "
        "WHEN lower(v) IN ('1', 'yes') THEN 'true' WHEN lower(v) IN ('0', 'no') THEN 'false' END"
    )
    date = (
        f"CASE WHEN regexp_matches(v, '{_DATE}') THEN "
        "strftime(TRY_CAST(v AS DATE), '%Y-%m-%d') "
        f"WHEN regexp_matches(v, '{_TIME}') THEN "
        + _TIMESTAMP.format(t="TRY_CAST(TRY_CAST(v AS TIMESTAMPTZ) AS TIMESTAMP)")
        # With a zone or offset it is now UTC, and says so, as a typed column's value does.
        + f" || CASE WHEN regexp_matches(v, '{_ZONED}') THEN 'Z' ELSE '' END END"
    )
    if value_type == "string":
        return "to_json(v)", "NULL"
    if value_type == "number":
        problem = (
            f"CASE WHEN {not_finite} THEN 'is not a finite number' "
            f"WHEN ({number}) IS NULL THEN 'is not a number' END"
        )
        return number, problem
    if value_type == "boolean":
        return boolean, f"CASE WHEN ({boolean}) IS NULL THEN 'is not true or false' END"
    if value_type == "date":
        return f"to_json({date})", f"CASE WHEN ({date}) IS NULL THEN 'is not a date' END"
    auto = (
        f"CASE WHEN lower(v) IN ('true', 'false') THEN lower(v) "
        f"WHEN ({number}) IS NOT NULL THEN {number} ELSE to_json(v) END"
    )
    return auto, f"CASE WHEN {not_finite} THEN 'is not a finite number' END"


def _typed_sql(arrow_type: pa.DataType, value_type: str) -> tuple[str, str] | None:
    """``(value, problem)`` expressions over ``x`` for a typed column; None when ``value_type``
    does not fit the column's type."""
    t = pa.types
    if t.is_boolean(arrow_type):
        return (
            ("CASE WHEN x THEN 'true' WHEN NOT x THEN 'false' END", "NULL")
            if value_type
            in (
                "auto",
                "boolean",
            )
            else None
        )
    if t.is_integer(arrow_type):
        if value_type == "string":
            return "to_json(CAST(x AS VARCHAR))", "NULL"
        return ("CAST(x AS VARCHAR)", "NULL") if value_type in ("auto", "number") else None
    if t.is_floating(arrow_type) or t.is_decimal(arrow_type):
        if value_type not in ("auto", "number"):
            return None
        d = "CAST(x AS DOUBLE)"
        return (
            f"CASE WHEN isfinite({d}) THEN {_number(d)} END",
            f"CASE WHEN NOT isfinite({d}) THEN 'is not a finite number' END",
        )
    if value_type not in ("auto", "date", "string"):
        return None
    if t.is_date(arrow_type):
        return "to_json(strftime(CAST(x AS DATE), '%Y-%m-%d'))", "NULL"
    if t.is_timestamp(arrow_type):
        if arrow_type.tz is None:
            return "to_json(" + _TIMESTAMP.format(t="x") + ")", "NULL"
        utc = "CAST(x AS TIMESTAMP)"  # the session's time zone is UTC: the UTC wall time
        return "to_json(" + _TIMESTAMP.format(t=utc) + " || 'Z')", "NULL"
    return None


def canonical_values(
    column: pa.Array | pa.ChunkedArray, *, value_type: str, source: str, name: str
) -> tuple[pa.Array, pa.Array]:
    """Each value of ``column`` as canonical JSON text (null: no value), and per row why the
    value cannot be used (null: it can).

    Raises ``SnapshotError`` naming ``source`` and the column ``name`` when the column's type
    cannot hold trait values (lists, binary) or does not fit ``value_type``.
    """
    import duckdb

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):  # pandas categoricals
        column = column.cast(column.type.value_type)
    kind = column.type
    if pa.types.is_null(kind):
        column, kind = column.cast(pa.large_string()), pa.large_string()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        value, problem = _text_sql(value_type)
        # Stripped, and blank is no value: as identity traits are read.
        select = (
            f"SELECT {value} AS value, CASE WHEN v IS NOT NULL THEN {problem} END AS problem "
            "FROM (SELECT NULLIF(trim(x), '') AS v FROM t)"
        )
    else:
        typed = _typed_sql(kind, value_type)
        if typed is None:
            wanted = "" if value_type == "auto" else f" with type = {value_type!r}"
            raise SnapshotError(
                f"{source}: column `{name}` has type {kind}, which cannot hold this computed "
                f"trait's values{wanted}; Crisp stores strings, numbers and booleans: export "
                "the column as one of those (or a date/timestamp), or change `type`"
            )
        value, problem = typed
        select = f"SELECT {value} AS value, {problem} AS problem FROM t"
    with duckdb.connect(":memory:") as con:
        con.execute("SET TimeZone = 'UTC'")
        con.register("t", pa.table({"x": column}))
        # A row with a problem has no value; the positions stay the input's (no parallel reorder).
        con.execute("SET preserve_insertion_order = true")
        result = con.sql(
            f"SELECT CASE WHEN problem IS NULL THEN value END AS value, problem FROM ({select})"
        ).to_arrow_table()
    return (
        result.column("value").cast(pa.large_string()).combine_chunks(),
        result.column("problem").cast(pa.string()).combine_chunks(),
    )
