"""Zero-copy access to the bytes of Arrow string arrays, for per-value work done in NumPy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["text_buffers"]

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
