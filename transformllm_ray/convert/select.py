"""Which chunks the convert stage converts, and which of them are left to do, without id lists on the driver.

    sel = selection(cfg)                       # counts from ingest's stats, one scalar threshold
    ds = chunks_ds(sel)                        # Ray Data: the selected chunk rows, read by workers
    ds = anti_join(ds, ledger.done_ids_ds())   # resume: the rows whose id is not committed yet
    check_exactly_once(sel, converted_files, reject_files, out_dir)   # every selected id in exactly one output row, or an error

The selection is the domain chunks of `ingest/chunks/` whose document is not held out (ingest's `split`
column), in id order, the first `convert.max_chunks`. "The first N in id order" is kept as one scalar, the
N-th smallest id, found from id counts per bin of the id space (nth_smallest_id); the readers then keep
`id <= threshold`. Tasks receive the threshold, never a list of ids, so
their work and memory do not grow with the corpus.

Resume and reconciliation are Ray Data group-bys over narrow rows (ids and a side tag) on a hash shuffle
(dataops.hash_shuffle); the driver receives counts and at most a few example ids.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from transformllm_ray.config import Config
from transformllm_ray.dataops import hash_shuffle, map_files, shuffle_partitions
from transformllm_ray.resources import TASK_CPUS
from transformllm_ray.schema import Chunk, arrow_schema
from transformllm_ray.storage import exists, list_files, read_json, read_parquet

CHUNK_COLUMNS = ["id", "doc_id", "split", "text", "position", "metadata"]


@dataclasses.dataclass(frozen=True)
class Selection:
    files: list[str]
    """ingest/chunks part files (one Ray task each)."""
    threshold: str | None
    """Largest selected chunk id (None: every eligible chunk)."""
    selected: int
    """Chunks selected: rows_in of the stage."""
    stats: dict[str, int]
    """chunks_available (domain chunks), heldout_chunks, beyond_max_chunks."""


def _eligible(uri: str, columns: list[str], threshold: str | None) -> pa.Table:
    """One ingest part's selected rows: domain, not held out, id <= threshold."""
    t = read_parquet(uri, columns=sorted(set(columns) | {"kind", "split", "id"}))
    keep = pc.and_(pc.equal(t["kind"], "domain"), pc.not_equal(t["split"], "heldout"))
    if threshold is not None:
        keep = pc.and_(keep, pc.less_equal(t["id"], threshold))
    return t.filter(keep).select(columns)


def selection(cfg: Config) -> Selection:
    ingest_dir = cfg.stage_dir("ingest")
    files = list_files(f"{ingest_dir}/chunks", ".parquet")
    if not files or not exists(f"{ingest_dir}/stats.json"):
        raise FileNotFoundError(f"no finished ingest under {ingest_dir}: run `transformllm ingest` first")
    by = read_json(f"{ingest_dir}/stats.json").get("by_kind_split", {}).get("domain", {})
    available = sum(v["chunks"] for v in by.values())
    heldout = by.get("heldout", {}).get("chunks", 0)
    eligible = available - heldout
    n = eligible if cfg.convert.max_chunks is None else min(cfg.convert.max_chunks, eligible)
    threshold = None
    if n < eligible:
        threshold = nth_smallest_id(files, n) if n > 0 else ""
    return Selection(files, threshold, n, {"chunks_available": available, "heldout_chunks": heldout,
                                           "beyond_max_chunks": eligible - n})


ID_BIN_CHARS = 4
"""Bins of the id space for nth_smallest_id: ids start with hex digits of a sha256, so the first 4 spread the
ids evenly over 65,536 bins; the driver sees one row per bin, whatever the corpus size."""


def _id_bins(uri: str) -> pa.Table:
    t = _eligible(uri, ["id"], None)
    return pa.table({"bin": pc.utf8_slice_codeunits(t["id"], 0, ID_BIN_CHARS), "n": pa.array([1] * t.num_rows, pa.int64())})


def _ids_in_bin(uri: str, bin: str) -> pa.Table:
    t = _eligible(uri, ["id"], None)
    return t.filter(pc.equal(pc.utf8_slice_codeunits(t["id"], 0, ID_BIN_CHARS), bin))


def nth_smallest_id(files: list[str], n: int) -> str:
    """The n-th smallest eligible chunk id (n >= 1), in two narrow passes instead of a global sort (whose
    shuffle grows the driver with the rows): a group-by counts ids per bin of their first hex digits (65,536
    rows reach the driver), the driver finds the bin where the running count reaches n, and only that bin's
    ids (~rows / 65,536) are read back and sorted."""
    import ray

    with hash_shuffle():
        counts = map_files(files, _id_bins).groupby("bin", num_partitions=shuffle_partitions()).aggregate(
            ray.data.aggregate.Sum("n", alias_name="n"))
        bins = sorted((str(r["bin"]), int(r["n"])) for r in counts.iter_rows())
    seen = 0
    for b, k in bins:
        if seen + k >= n:
            ids = sorted(str(r["id"]) for r in map_files(files, _ids_in_bin, {"bin": b}).take_all())
            return ids[n - seen - 1]
        seen += k
    raise RuntimeError(f"convert: ingest/stats.json promises {n} eligible chunks, the files hold {seen}: "
                       "ingest output changed; rerun ingest")


def chunks_ds(sel: Selection, columns: list[str] = CHUNK_COLUMNS):
    """The selected chunk rows as a Dataset (one read task per ingest part)."""
    return map_files(sel.files, _eligible, {"columns": columns, "threshold": sel.threshold})


# ------------------------------------------------------------------------------------------------ anti-join
def _tagged(batch: pa.Table, side: int) -> pa.Table:
    return batch.append_column("_side", pa.array([side] * batch.num_rows, pa.int8()))


def _padded(batch: pa.Table, schema: pa.Schema, on: str) -> pa.Table:
    """An id-only batch padded to `schema` (nulls), tagged side 1."""
    cols = {f.name: (batch[on] if f.name == on else pa.nulls(batch.num_rows, f.type)) for f in schema}
    return _tagged(pa.table(cols, schema=schema), 1)


def _keep_unmatched(group: pa.Table) -> pa.Table:
    """map_groups over one id: its left rows if no right row shares the id, else nothing."""
    if pc.any(pc.equal(group["_side"], 1)).as_py():
        return group.slice(0, 0).drop_columns(["_side"])
    return group.drop_columns(["_side"])


def anti_join(left, right, schema: pa.Schema, on: str = "id"):
    """Rows of `left` (columns exactly `schema`) whose `on` value is in no row of `right` (column `on`).

    A group-by on `on` over both sides (dataops.hash_shuffle), no extra dependency. Used on resume only (a
    fresh run has nothing to subtract), so its per-id group call is paid only then."""
    with hash_shuffle():
        lt = left.map_batches(_tagged, fn_kwargs={"side": 0}, batch_format="pyarrow", num_cpus=TASK_CPUS)
        rt = right.map_batches(_padded, fn_kwargs={"schema": schema, "on": on}, batch_format="pyarrow",
                               num_cpus=TASK_CPUS)
        return lt.union(rt).groupby(on, num_partitions=shuffle_partitions()).map_groups(
            _keep_unmatched, batch_format="pyarrow")


def chunk_schema(columns: list[str] = CHUNK_COLUMNS) -> pa.Schema:
    s = arrow_schema(Chunk)
    return pa.schema([s.field(c) for c in columns])


# ------------------------------------------------------------------------------------------------ reconcile
def _ids_of(uri: str, column: str, side: int) -> pa.Table:
    t = read_parquet(uri, columns=[column])
    return pa.table({"id": t[column], "side": pa.array([side] * t.num_rows, pa.int64())})


def check_exactly_once(sel: Selection, converted: list[str], rejects: list[str], out_dir: str) -> None:
    """Every selected id in exactly one output row (converted/ `id` or rejects/ `ref`), and no other id.

    One group-by over narrow (id, side) rows: selected ids carry side 1, output ids side 2; an id is in
    order iff its group sums to 3 with 2 rows. The driver receives the count of ids out of order and 3
    examples, whatever the corpus size."""
    import ray

    parts = [map_files(sel.files, _selected_ids, {"threshold": sel.threshold})]
    parts += [map_files(converted, _ids_of, {"column": "id", "side": 2})]
    parts += [map_files(rejects, _ids_of, {"column": "ref", "side": 2})]
    parts = [p for p in parts if p is not None]
    with hash_shuffle():
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        agg = ds.groupby("id", num_partitions=shuffle_partitions()).aggregate(
            ray.data.aggregate.Count(alias_name="n"), ray.data.aggregate.Sum("side", alias_name="s"))
        bad = agg.filter(expr="n != 2 or s != 3").materialize()
    n_bad = bad.count()
    if n_bad:
        ex = [(r["id"], _describe(int(r["n"]), int(r["s"]))) for r in bad.take(3)]
        raise RuntimeError(f"convert: output does not hold each selected chunk exactly once: {n_bad} ids out of "
                           f"order (e.g. {ex}); rerun convert to redo missing ones, or delete "
                           f"{out_dir} if it holds another run's work")


def _selected_ids(uri: str, threshold: str | None) -> pa.Table:
    t = _eligible(uri, ["id"], threshold)
    return pa.table({"id": t["id"], "side": pa.array([1] * t.num_rows, pa.int64())})


def _describe(n: int, s: int) -> str:
    out = s - n  # each output row adds 2, each selection 1: outputs = s - n
    sel = n - out
    if sel == 0:
        return "in the output but not selected"
    if out == 0:
        return "selected but missing from the output"
    return f"in the output {out} times"
