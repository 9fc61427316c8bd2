"""pack/windows.py, the one packer: equal to the plain definition (concatenate text + EOS, cut seq_len
windows, drop the tail) on random token lists, from Python lists and from chunked Arrow columns."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from transformllm_ray.pack.windows import cut, join_with_eos, windows_column


def _plain(lists: list[list[int]], eos: int, seq_len: int) -> list[list[int]]:
    stream = [t for ids in lists for t in ids + [eos]]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def test_matches_the_plain_definition():
    rng = random.Random(0)
    for _ in range(50):
        lists = [[rng.randrange(1, 50_000) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(0, 12))]
        seq_len = rng.randrange(1, 30)
        buf, ends = join_with_eos(lists, eos_id=0)
        assert cut(buf, seq_len).tolist() == _plain(lists, 0, seq_len)
        assert ends.tolist() == list(np.cumsum([len(x) + 1 for x in lists]))
        chunked = pa.chunked_array([pa.array(lists[:3], pa.list_(pa.int32())), pa.array(lists[3:], pa.list_(pa.int32()))])
        assert join_with_eos(chunked, 0)[0].tolist() == buf.tolist()


def test_column_and_empty_input():
    w = cut(join_with_eos([[5, 6], [7]], eos_id=0)[0], 2)
    assert w.tolist() == [[5, 6], [0, 7]]
    col = windows_column(w)
    assert col.type == pa.list_(pa.int32()) and col.to_pylist() == [[5, 6], [0, 7]]
    buf, ends = join_with_eos([], eos_id=0)
    assert len(buf) == 0 and len(ends) == 0 and windows_column(cut(buf, 4)).to_pylist() == []
