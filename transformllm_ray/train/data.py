"""What each worker trains on at each step, and where a resumed run picks up (the data position).

    plan = DataPlan(rows=n_train, world=2, micro_batch=1, accum=4, seq_len=2048)
    for step, micro_batches in plan.steps(shard, start_step=resumed_step, max_steps=100): ...

The packed train split reaches the workers through Ray Data: `ray.train.get_dataset_shard("train")`, a
streaming split with `equal=True` (every worker gets floor(rows / world) rows) and `preserve_order=True`
(set by stage.py). With order preserved, Ray's splitter hands blocks in file order to the worker with the
fewest rows so far and ignores locality, so each worker sees the same rows in the same order on every run
and every epoch. That is what makes the data position small: a step number. Global step s (1-based) is
epoch (s-1) // steps_per_epoch, micro-batches [k*accum, (k+1)*accum) of that epoch with
k = (s-1) % steps_per_epoch. A resumed run skips the already-trained micro-batches of its epoch (reading,
not computing: ~1 ms per 2,048-token row), then continues, bit-exactly as an uninterrupted run would.

Per epoch a worker uses steps_per_epoch * accum * micro_batch of its rows: the tail that does not fill an
optimizer step is left out (the same rows each epoch). Sequences are not reshuffled between epochs; the pack
stage already shuffles them (and continued pre-training rarely runs more than one epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class DataPlan:
    rows: int
    """Packed sequences in the train split."""
    world: int
    """Training workers (data-parallel ranks)."""
    micro_batch: int
    """Sequences per worker per forward pass."""
    accum: int
    """Micro-batches per optimizer step."""
    seq_len: int
    """Tokens per sequence."""

    @property
    def rows_per_worker(self) -> int:
        return self.rows // self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_worker // (self.micro_batch * self.accum)

    @property
    def sequences_per_step(self) -> int:
        return self.world * self.micro_batch * self.accum

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches of that epoch already trained) after `step` optimizer steps."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, k * self.accum

    def distinct_rows_trained(self, steps: int) -> int:
        """Distinct sequences (over all workers) trained at least once in `steps` steps."""
        per_step = self.sequences_per_step
        return min(steps, self.steps_per_epoch) * per_step

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            need = self.world * self.micro_batch * self.accum
            raise ValueError(f"train: {self.rows} packed sequences are fewer than one optimizer step needs "
                             f"({self.world} workers x micro_batch_size {self.micro_batch} x grad_accum_steps "
                             f"{self.accum} = {need}); pack more text or lower those settings")

    def steps(self, shard, start_step: int, max_steps: int) -> Iterator[tuple[int, list]]:
        """Yield (step, [accum micro-batches of shape (micro_batch, seq_len), int64]) for steps
        start_step+1 .. max_steps, reading `shard` (a Ray DataIterator) epoch after epoch."""
        step = start_step
        epoch, skip = self.position(start_step)
        while step < max_steps:
            group: list = []
            for i, mb in enumerate(micro_batches(shard, self.micro_batch, self.seq_len)):
                if i < skip:
                    continue
                if i >= self.steps_per_epoch * self.accum:
                    break  # the epoch's tail that does not fill a step
                group.append(mb)
                if len(group) == self.accum:
                    step += 1
                    yield step, group
                    group = []
                    if step >= max_steps:
                        return
            epoch, skip = epoch + 1, 0


def micro_batches(shard, micro_batch: int, seq_len: int) -> Iterator:
    """One epoch of `shard` as int64 tensors of shape (micro_batch, seq_len); a short last batch is dropped.

    Read as Arrow and flattened (no per-row Python objects). A row whose length is not seq_len is an input
    error, raised with the lengths seen.
    """
    import numpy as np
    import pyarrow as pa
    import torch

    for batch in shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True,
                                    prefetch_batches=2):
        col = batch.column("input_ids").combine_chunks()
        if isinstance(col.type, pa.FixedSizeListType):
            lengths_ok = col.type.list_size == seq_len
        else:
            offsets = col.offsets.to_numpy()
            lengths_ok = bool((np.diff(offsets) == seq_len).all())
        if not lengths_ok or len(col.flatten()) != micro_batch * seq_len:
            raise ValueError(f"train: packed rows must hold exactly train.seq_len={seq_len} token ids; got "
                             f"{len(col.flatten())} ids in {len(col)} rows")
        ids = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(micro_batch, seq_len)
        yield torch.from_numpy(ids)


def read_val_batches(files: list[str], rank: int, n_batches: int, micro_batch: int, seq_len: int) -> list:
    """This rank's validation micro-batches: rows [rank*n, (rank+1)*n) of the val split in file order,
    n = n_batches * micro_batch; read once with pyarrow and kept in memory.

    Not through Ray Data: a second streaming split costs ~5-7 s of start-up on a 2-core machine (a
    coordinator actor and read tasks) to deliver a few hundred kB, and every evaluation re-reads the same
    rows anyway. The driver sizes n_batches so every rank gets full batches (stage.py).
    """
    import numpy as np
    import torch

    from transformllm_ray.storage import read_parquet

    need_lo, need_hi = rank * n_batches * micro_batch, (rank + 1) * n_batches * micro_batch
    rows: list = []
    seen = 0
    for uri in files:
        if seen >= need_hi:
            break
        col = read_parquet(uri, columns=["input_ids"])["input_ids"]
        lo, hi = max(need_lo - seen, 0), min(need_hi - seen, len(col))
        if lo < hi:
            rows += col.slice(lo, hi - lo).to_pylist()
        seen += len(col)
    if len(rows) != need_hi - need_lo or any(len(r) != seq_len for r in rows):
        raise ValueError(f"val: expected {need_hi - need_lo} rows of {seq_len} tokens for rank {rank}")
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return list(ids.split(micro_batch))
