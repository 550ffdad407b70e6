"""Arrow text from pandas, and zero-copy access to its bytes for per-value work in NumPy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = ["arrow_text", "large_text", "text_buffers"]

_EMPTY = np.zeros(0, dtype=np.uint8)


def text_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, data)`` of a string or large_string array, without copying.

    Value ``i`` is ``data[offsets[i]:offsets[i + 1]]`` (a null value is empty); ``offsets``
    has ``len(array) + 1`` entries and already accounts for a sliced array's offset.
    """
    _, offsets_buffer, data_buffer = array.buffers()
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[
        array.offset : array.offset + len(array) + 1
    ]
    data = _EMPTY if data_buffer is None else np.frombuffer(data_buffer, dtype=np.uint8)
    return offsets, data


def arrow_text(values: pd.Index | pd.Series) -> pa.ChunkedArray | pa.Array:
    """``values`` as Arrow text; zero copy for pyarrow-backed strings."""
    array = pa.array(values.array) if not isinstance(values.dtype, np.dtype) else None
    if array is None or not (
        pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
    ):
        array = pa.array(values.astype("string[pyarrow]").array)
    return array


def large_text(*values: pd.Index | pd.Series) -> pa.Array:
    """All of ``values`` as one large_string array (one type and chunk, for joins and sets)."""
    arrays = [arrow_text(v).cast(pa.large_string()) for v in values if len(v)]
    chunks = [c for a in arrays for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.large_string())
