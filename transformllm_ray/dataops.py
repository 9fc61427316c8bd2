"""Ray Data building blocks shared by the stages: the base of our callable stages, work units with completion
markers, per-file reads of our own parts, and the group-by steps (hash shuffle, sized to the cluster).

    class Tokenize(BatchUDF):
        input_columns = ("text",)
        def __init__(self, tokenizer): ...                # loads once per actor
        def map(self, batch): return {**batch, "ids": ...}  # one output row per input row (checked)

    counts = run_units("ingest", units, ShardProcessor, {"cfg_json": ...}, marker_dir, ingest_pool(cfg))

A *work unit* is a small descriptor (a row: `unit_id` plus what the unit reads). Its worker writes the unit's
outputs under names derived from `unit_id` (atomic writes: a retry overwrites, never duplicates), then
`<marker_dir>/<unit_id>.json` with the unit's counts, last. `run_units` skips units whose marker exists, so a
rerun after a kill -9 or a lost node redoes only the units that were in flight. The driver holds the list of
unit descriptors and one small dict of counts per unit: O(units), never O(rows).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

from transformllm_ray.console import progress, say
from transformllm_ray.resources import TASK_CPUS, Pool
from transformllm_ray.storage import exists, read_json

log = logging.getLogger("transformllm")
MAX_SHUFFLE_PARTITIONS = 64


class BatchUDF:
    """Base of our Ray Data callable classes: `__init__` loads, `map(batch)` maps a batch (dict of columns).

    `__call__` checks that the batch has `input_columns` and that `map` returned one row per input row, so a
    stage can neither read a column nobody gave it nor drop a row silently."""

    input_columns: tuple[str, ...] = ()

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        missing = [c for c in self.input_columns if c not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} needs columns {missing} (got {sorted(batch)})")
        n = len(batch[self.input_columns[0]]) if self.input_columns else None
        out = self.map(batch)
        if n is not None:
            sizes = {k: len(v) for k, v in out.items()}
            if any(s != n for s in sizes.values()):
                raise AssertionError(f"{type(self).__name__}: {n} rows in, column sizes out {sizes}: "
                                     "one output row per input row")
        return out


class UnitWorker(BatchUDF):
    """A work-unit stage: one unit row in, one row of counts out. Subclasses implement `process(unit)`, which
    writes the unit's outputs and returns its counts (JSON-serialisable, the same keys for every unit);
    `__call__` writes the marker after it, or returns the marker's counts if the unit is already done."""

    input_columns: tuple[str, ...] = ("unit_id",)

    def __init__(self, marker_dir: str):
        self.marker_dir = marker_dir

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def map(self, batch: dict[str, Any]) -> dict[str, list]:
        from transformllm_ray.storage import write_json_atomic

        rows = []
        for i in range(len(batch["unit_id"])):
            unit = {k: _plain(v[i]) for k, v in batch.items()}
            marker = f"{self.marker_dir}/{unit['unit_id']}.json"
            if exists(marker):  # done by an earlier attempt of this task, or an earlier run
                rows.append(read_json(marker))
                continue
            counts = {"unit_id": unit["unit_id"], **self.process(unit)}
            write_json_atomic(marker, counts)
            rows.append(counts)
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def run_units(label: str, units: list[dict], worker: type[UnitWorker], ctor_kwargs: dict, marker_dir: str,
              pool: Pool, env: dict[str, str] | None = None, unit: str = "units") -> list[dict]:
    """Run the units not yet marked on `pool` (resources.py; at most one actor per unit); returns every unit's
    counts."""
    import ray

    pending = [u for u in units if not exists(f"{marker_dir}/{u['unit_id']}.json")]
    pending_ids = {u["unit_id"] for u in pending}
    done = [read_json(f"{marker_dir}/{u['unit_id']}.json") for u in units if u["unit_id"] not in pending_ids]
    if done:
        say(f"[{label}] resuming: {len(done)}/{len(units)} units already done")
    if not pending:
        return done
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(
        worker, fn_constructor_kwargs={"marker_dir": marker_dir, **ctor_kwargs}, batch_size=1,
        **pool.actor_pool(available=len(pending)), runtime_env={"env_vars": env} if env else None)
    out = list(done)
    with progress(label, len(units), unit) as bar:
        bar.set(len(done))
        for row in ds.iter_rows():
            out.append(row)
            bar.update(1)
    return out


def shuffle_partitions() -> int:
    """Partitions of a group-by step: one per CPU of the cluster, at most 64. The dedup and reconciliation
    steps shuffle narrow rows (ids, hashes, counts): 64 partitions of a 10x-presets corpus (~20M chunks, ~60
    bytes a row) are ~20 MB each. Pack's step shuffles token ids, grouped by bucket (pack.bucket_tokens)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(MAX_SHUFFLE_PARTITIONS, cpus))


def map_files(uris: Iterable[str], fn, fn_kwargs: dict | None = None, num_cpus: float = TASK_CPUS):
    """A Dataset of the rows `fn(uri, **fn_kwargs)` returns (a pyarrow Table) for each file, one Ray task per
    file. For our own Parquet parts, whose names we know: it skips `read_parquet`'s file-listing task, a fixed
    ~2 s per read on a 2-core machine that would dominate the small reads of a debug run. None if no files."""
    import ray

    uris = list(uris)
    if not uris:
        return None

    def _apply(batch: dict[str, Any]):
        import pyarrow as pa

        tables = [fn(str(u), **(fn_kwargs or {})) for u in batch["uri"]]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    return ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris)).map_batches(
        _apply, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


@contextlib.contextmanager
def hash_shuffle():
    """Datasets created inside use Ray Data's hash shuffle for group-bys (aggregator actors hold the
    partitions). Chosen for the driver's memory: with the sort-based shuffle, the driver's peak RSS grew with
    the rows shuffled (measured: a group-by over 175k document rows took it from 165 to 652 MB; the hash
    shuffle, 314 MB). The price is a fixed start-up of the aggregators per execution, seconds, not per row."""
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    try:
        yield
    finally:
        ctx.shuffle_strategy = before
