"""The one packer: token lists joined with EOS and cut into `seq_len` windows, vectorised.

Used by the pack stage (each bucket, pack_group), by eval (its held-out windows) and by the train tests' and
benchmarks' packed inputs, so every packed sequence in the project is made the same way.

    buf, ends = join_with_eos([[5, 6], [7]], eos_id=0)   # buf [5, 6, 0, 7, 0], ends [3, 5]
    w = cut(buf, seq_len=2)                              # [[5, 6], [0, 7]]; the tail [0] is waste
    column = windows_column(w)                           # list<int32> Arrow column of the windows
"""

from __future__ import annotations

from typing import Any

import numpy as np


def join_with_eos(token_lists: Any, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(buf, ends): the texts' tokens, each followed by EOS, in one int32 array; ends[i] = index after text
    i's EOS. `token_lists`: an Arrow list array (chunked or not) or a Python list of lists."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = token_lists if isinstance(token_lists, (pa.Array, pa.ChunkedArray)) else pa.array(
        token_lists, pa.list_(pa.int32()))
    lens = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), dtype=np.int64) + 1
    flat = np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.int32)
    ends = np.cumsum(lens)
    buf = np.full(int(ends[-1]) if len(ends) else 0, eos_id, dtype=np.int32)
    mask = np.ones(len(buf), dtype=bool)
    mask[ends - 1] = False  # each text's EOS slot; its tokens fill the slots before it
    buf[mask] = flat
    return buf, ends


def cut(buf: np.ndarray, seq_len: int) -> np.ndarray:
    """The full `seq_len` windows of buf, shape (n, seq_len); the shorter tail (< seq_len tokens) is left out."""
    n = len(buf) // seq_len
    return buf[: n * seq_len].reshape(n, seq_len)


def windows_column(windows: np.ndarray) -> Any:
    """An (n, seq_len) int array as the list<int32> Arrow column of packed/ parts."""
    import pyarrow as pa

    n, seq_len = windows.shape
    if not n:
        return pa.array([], pa.list_(pa.int32()))
    flat = pa.array(np.ascontiguousarray(windows, dtype=np.int32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, seq_len).cast(pa.list_(pa.int32()))
