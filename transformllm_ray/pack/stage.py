"""Pack stage: tokenise training texts, mix in general text, join with EOS, cut fixed-length sequences; on
Ray Data workers, with the driver holding O(files + buckets), never tokens.

    transformllm pack --config configs/debug-local.yaml

Inputs
- domain: the `text` of `convert/converted/` (or of `pack.domain_paths`, any Parquet with a text column, so
  packing works before/without conversion), plus, with `pack.include_raw_chunks`, the raw chunks of the
  domain documents of which no chunk was converted (kind `raw`);
- general: ingest's `general` chunks, mixed in at `pack.mix_ratio` general tokens per domain token.
Held-out chunks are never read (they are eval's); every row keeps the `split` ingest gave its document.

Algorithm (three phases, each resumable):
A. Tokenise (work units = input files, `dataops.run_units`). Each unit writes `_tokens/<unit>.parquet`
   (kind, split, id, doc_id, key, n_tokens, input_ids), then its marker with counts by kind and split.
   `key` = 60 bits of sha256(seed:doc_id): the seeded order of documents; every row of a document, raw or
   converted, shares it, so a document stays contiguous and lands in one bucket.
B. Mix budget (narrow rows). Per split, the general budget is mix_ratio x domain tokens (EOS included). The
   general rows are taken in (key, id) order until the budget: Ray tasks sum tokens per key bin (2^16 bins),
   the driver finds the bin that crosses the budget and walks only that bin's rows; the crossing row is cut
   to the exact remainder, later rows are `general_not_needed`. One threshold per split: the mix is met to
   the token.
C. Pack (a hash-shuffle group-by on (split, bucket)). bucket = key x n_buckets >> 60, n_buckets =
   ceil(split tokens / pack.bucket_tokens). Each group is sorted by (key, id); raw rows of documents that have
   converted rows are dropped (`raw_superseded`); texts are joined with EOS and cut into `train.seq_len`
   windows (pack/windows.py, the packer eval and the tests use too); the bucket's last partial window is
   dropped as waste. The worker writes
   `packed/<split>/part-<bucket>.parquet` then its marker; a rerun skips marked buckets.

Waste bound: at most seq_len - 1 tokens per bucket, i.e. < n_buckets x seq_len tokens in all (at the presets'
1B tokens with 16M-token buckets and seq_len 2048: < 64 x 2048 = 0.013%).
Deterministic: the inputs, the seed and the config fix every key, threshold, bucket and order, so a rerun
(after a kill -9 at any moment, too) writes the same sequences. A sequence's id is bucket << 32 | index.

Outputs (under pack/): `packed/train/part-*.parquet`, `packed/val/part-*.parquet` (input_ids list<int32> of
exactly seq_len, sequence, doc_ids), stats.json. Rows are input rows (texts): rows_in = rows_out (packed) +
rows_rejected (empty, general_not_needed, raw_superseded, heldout for pack.domain_paths rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from transformllm_ray.config import Config
from transformllm_ray.console import say
from transformllm_ray.dataops import UnitWorker, hash_shuffle, map_files, run_units, shuffle_partitions
from transformllm_ray.pack import decontam
from transformllm_ray.pack.windows import cut, join_with_eos, windows_column
from transformllm_ray.resources import SHUFFLE_TASK_CPUS, pack_pool
from transformllm_ray.schema import Reject, make_reject, to_table
from transformllm_ray.splits import SPLITS
from transformllm_ray.stage import write_stats
from transformllm_ray.storage import (
    exists, expand_inputs, files_digest, list_files, makedirs, read_json, read_parquet, remove, remove_temporaries,
    write_json_atomic, write_parquet_atomic,
)
from transformllm_ray.text import content_id

log = logging.getLogger("transformllm")
STAGE = "pack"


def inputs(cfg: Config) -> dict:
    """What pack's output depends on (stage.py): the tokenizer it resolves, seq_len, the mix, the bucket
    layout and the seed (document order); not its actors."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import remembered, section

    out = {**section(cfg.pack, "pack", exclude=["tokenizer", "num_actors", "cpus_per_actor"]),
           "pack.tokenizer": model_key(cfg.pack_tokenizer), "train.seq_len": cfg.train.seq_len, "seed": cfg.seed}
    if cfg.pack.domain_paths:
        out["pack.domain_files"] = remembered("files:" + "\n".join(cfg.pack.domain_paths),
                                              lambda: files_digest(expand_inputs(cfg.pack.domain_paths)))
    if cfg.pack.decontaminate.enabled:  # the eval files checked against, by content too
        paths = cfg.eval.decontaminate_paths
        out["eval.decontaminate_paths"] = paths
        out["eval.decontaminate_text_field"] = cfg.eval.decontaminate_text_field
        if paths:
            out["eval.decontaminate_files"] = remembered("files:" + "\n".join(paths),
                                                         lambda: files_digest(expand_inputs(paths)))
    return out
KEY_BITS = 60
TRAIN_SPLITS = ("train", "val")
TOKEN_SCHEMA = pa.schema([("kind", pa.string()), ("split", pa.string()), ("id", pa.string()),
                          ("doc_id", pa.string()), ("key", pa.int64()), ("n_tokens", pa.int64()),
                          ("input_ids", pa.list_(pa.int32()))])
"""_tokens/ parts: one row per input text."""
PACKED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("sequence", pa.int64()),
                           ("doc_ids", pa.list_(pa.string()))])


def order_key(seed: int, doc_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[: KEY_BITS // 4], 16)


# ------------------------------------------------------------------------------------------------ phase A
def plan_units(cfg: Config) -> list[dict]:
    """Tokenising units: one per input file. role: converted | external (pack.domain_paths) | ingest."""
    units: list[tuple[str, str]] = []
    if cfg.pack.domain_paths:
        units += [("external", f.uri) for f in expand_inputs(cfg.pack.domain_paths)]
    else:
        conv_dir = f"{cfg.stage_dir('convert')}/converted"
        units += [("converted", u) for u in list_files(conv_dir, ".parquet")]
        if not units and not cfg.pack.include_raw_chunks:
            raise FileNotFoundError(f"no converted text under {conv_dir}: run `transformllm convert` first, or "
                                    "set pack.domain_paths or pack.include_raw_chunks=true")
    if cfg.pack.include_raw_chunks or cfg.pack.mix_ratio > 0:
        ingest = list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet")
        if not ingest:
            raise FileNotFoundError(f"no chunks under {cfg.stage_dir('ingest')}/chunks: run `transformllm ingest`")
        units += [("ingest", u) for u in ingest]
    return [{"unit_id": "tok-" + hashlib.sha256(f"{r}\t{u}".encode()).hexdigest()[:16], "role": r, "uri": u}
            for r, u in units]


def unit_rows(cfg: Config, role: str, uri: str) -> tuple[pa.Table, dict[str, int]]:
    """(kind, split, id, doc_id, text) rows a unit packs, and its rows rejected before tokenising."""
    rejected: dict[str, int] = {}
    if role == "converted":
        t = read_parquet(uri, columns=["id", "doc_id", "split", "text", "status"])
        t = t.filter(pc.equal(t["status"], "ok"))
        kind = pa.array(["domain"] * t.num_rows, pa.string())
        return pa.table({"kind": kind, "split": t["split"], "id": t["id"], "doc_id": t["doc_id"],
                         "text": t["text"]}), rejected
    if role == "external":
        t = read_parquet(uri)
        if "text" not in t.column_names:
            raise ValueError(f"pack.domain_paths: no `text` column in {uri} (columns {t.column_names})")
        texts = [x or "" for x in t["text"].to_pylist()]
        ids = ([str(x) for x in t["id"].to_pylist()] if "id" in t.column_names
               else [f"{uri}#R{i}" for i in range(t.num_rows)])
        docs = (t["doc_id"].to_pylist() if "doc_id" in t.column_names else [content_id(x) for x in texts])
        # Rows from outside the pipeline: their own split column if they have one, else every row is train.
        splits = t["split"].to_pylist() if "split" in t.column_names else ["train"] * t.num_rows
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ValueError(f"pack.domain_paths: {uri}: split must be one of {SPLITS}, got {bad[0]!r}")
        t = pa.table({"kind": ["domain"] * t.num_rows, "split": splits, "id": ids, "doc_id": docs, "text": texts},
                     schema=pa.schema([(c, pa.string()) for c in ("kind", "split", "id", "doc_id", "text")]))
        held = pc.equal(t["split"], "heldout")
        rejected["heldout"] = int(pc.sum(held).as_py() or 0)
        return t.filter(pc.invert(held)), rejected
    t = read_parquet(uri, columns=["kind", "split", "id", "doc_id", "text"])
    kinds = []
    if cfg.pack.include_raw_chunks:
        kinds.append("domain")
    if cfg.pack.mix_ratio > 0:
        kinds.append("general")
    keep = pc.and_(pc.is_in(t["kind"], value_set=pa.array(kinds, pa.string())), pc.not_equal(t["split"], "heldout"))
    t = t.filter(keep)
    kind = pc.if_else(pc.equal(t["kind"], "domain"), "raw", "general")
    return t.set_column(0, "kind", kind), rejected


class TokenizeUnit(UnitWorker):
    """Ray Data stage: one input file (unit_id, role, uri) in, one row of counts out; writes the file's
    tokenised rows to `_tokens/<unit_id>.parquet`. __init__ loads the training tokenizer once per actor."""

    input_columns = ("unit_id", "role", "uri")

    def __init__(self, marker_dir: str, cfg_json: str, index_parts: list[str], common_parts: list[str]):
        from transformllm_ray.config import config_from_dict
        from transformllm_ray.models.assets import load_fast_tokenizer

        super().__init__(marker_dir)
        self.cfg = config_from_dict(json.loads(cfg_json))
        self.tok = load_fast_tokenizer(self.cfg.pack_tokenizer)
        self.index = None
        if self.cfg.pack.decontaminate.enabled:
            common = read_parquet(common_parts, columns=["hash"])["hash"].to_numpy() if common_parts else None
            self.index = decontam.EvalIndex.load(index_parts)
            if common is not None and len(common):
                self.index = self.index.without(common)
            self.hasher = decontam.NGramHasher(self.cfg.pack.decontaminate.ngram_words)

    def decontaminate(self, t: pa.Table, unit_id: str) -> tuple[pa.Table, dict[str, int]]:
        """The rows sharing an eval n-gram go to `rejects/<unit>.parquet`, naming the eval item; returns the
        others and the rejected rows per kind."""
        n = self.hasher.n
        keep: list[bool] = []
        rejects: list[Reject] = []
        by_kind: dict[str, int] = {}
        for rid, kind, text in zip(t["id"].to_pylist(), t["kind"].to_pylist(), t["text"].to_pylist()):
            ws = decontam.words(text)
            hit = self.index.first_hit(self.hasher.window_hashes(ws)) if self.index is not None else None
            keep.append(hit is None)
            if hit is not None:
                j, item = hit
                by_kind[kind] = by_kind.get(kind, 0) + 1
                rejects.append(make_reject(STAGE, rid, decontam.REASON, f"{kind} text shares the {n}-word sequence "
                                           f"in the excerpt with eval item {item}", " ".join(ws[j:j + n]), limit=1000))
        if rejects:
            write_parquet_atomic(to_table(rejects, Reject), reject_part(self.cfg, unit_id))
        return t.filter(pa.array(keep, pa.bool_())), by_kind

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        t, rejected = unit_rows(self.cfg, unit["role"], unit["uri"])
        keep = [bool(x.strip()) for x in t["text"].to_pylist()]
        rejected["empty"] = keep.count(False)
        t = t.filter(pa.array(keep, pa.bool_()))
        t, contaminated = self.decontaminate(t, unit["unit_id"]) if self.index is not None else (t, {})
        rejected[decontam.REASON] = sum(contaminated.values())
        ids: list[list[int]] = []
        texts = t["text"].to_pylist()
        for i in range(0, len(texts), 256):
            ids += [e.ids for e in self.tok.encode_batch(texts[i:i + 256], add_special_tokens=False)]
        seed = self.cfg.seed
        out = pa.table({
            "kind": t["kind"], "split": t["split"], "id": t["id"], "doc_id": t["doc_id"],
            "key": pa.array([order_key(seed, d) for d in t["doc_id"].to_pylist()], pa.int64()),
            "n_tokens": pa.array([len(x) for x in ids], pa.int64()),
            "input_ids": pa.array(ids, pa.list_(pa.int32()))}, schema=TOKEN_SCHEMA)
        write_parquet_atomic(out, token_part(self.cfg, unit["unit_id"]))
        counts: dict[str, Any] = {"rows_in": t.num_rows + sum(rejected.values()),
                                  "rejected": json.dumps(rejected, sort_keys=True)}
        by: dict[str, list[int]] = {}
        for kind, split, n in zip(t["kind"].to_pylist(), t["split"].to_pylist(), out["n_tokens"].to_pylist()):
            r = by.setdefault(f"{kind}/{split}", [0, 0])
            r[0] += 1
            r[1] += n + 1  # + the EOS that joins it to the next text
        counts["by"] = json.dumps(by, sort_keys=True)
        counts["contaminated"] = json.dumps(contaminated, sort_keys=True)
        return counts


def token_part(cfg: Config, unit_id: str) -> str:
    return f"{cfg.stage_dir(STAGE)}/_tokens/{unit_id}.parquet"


def reject_part(cfg: Config, unit_id: str) -> str:
    return f"{cfg.stage_dir(STAGE)}/rejects/{unit_id}.parquet"


# ------------------------------------------------------------------------------------------------ phase A0
def eval_sources(cfg: Config) -> list[dict]:
    """Index units of decontamination: ingest's chunk parts (their held-out chunks) and the user's eval files."""
    from transformllm_ray.stage import upstream

    out = f"{cfg.stage_dir(STAGE)}/_decontam"
    units = []
    if "ingest" in upstream(cfg, STAGE):
        units += [{"role": "heldout", "uri": u, "size": 0}
                  for u in list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet")]
    units += [{"role": "file", "uri": f.uri, "size": f.size} for f in expand_inputs(cfg.eval.decontaminate_paths)]
    for u in units:
        u["out"] = f"{out}/index-" + hashlib.sha256(f"{u['role']}\t{u['uri']}".encode()).hexdigest()[:16] + ".parquet"
    return units


def prepare_decontamination(cfg: Config, units: list[dict]) -> dict[str, Any]:
    """Phase A0: the eval n-gram index (a part per eval source) and, with max_matches, the n-grams too common
    in the training units to count. Returns the counts for stats."""
    dc = cfg.pack.decontaminate
    out = f"{cfg.stage_dir(STAGE)}/_decontam"
    sources = eval_sources(cfg)
    say(f"[pack] decontamination: indexing {len(sources)} eval sources ({dc.ngram_words}-word n-grams)")
    info: dict[str, Any] = {"ngram_words": dc.ngram_words, "max_matches": dc.max_matches,
                            "heldout_parts": sum(u["role"] == "heldout" for u in sources),
                            "eval_files": sum(u["role"] == "file" for u in sources)}
    info.update(decontam.build_index(sources, dc.ngram_words, cfg.eval.decontaminate_text_field))
    if dc.max_matches is not None and info["eval_ngrams"]:
        info.update(decontam.common_ngrams(cfg.model_dump_json(), units, [u["out"] for u in sources], out,
                                           dc.max_matches, shuffle_partitions()))
    return info


# ------------------------------------------------------------------------------------------------ phase B
def _narrow(uri: str, kinds: list[str]) -> pa.Table:
    t = read_parquet(uri, columns=["kind", "split", "doc_id", "id", "key", "n_tokens"])
    return t.filter(pc.is_in(t["kind"], value_set=pa.array(kinds, pa.string())))


def _doc_flags(batch: pa.Table) -> pa.Table:
    conv = pc.cast(pc.equal(batch["kind"], "domain"), pa.int64())
    raw_tok = pc.if_else(pc.equal(batch["kind"], "raw"), pc.add(batch["n_tokens"], 1), 0)
    return pa.table({"doc_id": batch["doc_id"], "conv": conv, "raw_rows": pc.subtract(1, conv),
                     "raw_tok": raw_tok, "val": pc.cast(pc.equal(batch["split"], "val"), pa.int64())})


def superseded_raw(parts: list[str]) -> dict[str, list[int]]:
    """{split: [rows, tokens]} of raw chunks of documents that also have converted rows (they are dropped in
    phase C): a group-by over doc ids of narrow rows, vectorised aggregations only."""
    import ray

    ds = map_files(parts, _narrow, {"kinds": ["domain", "raw"]})
    if ds is None:
        return {}
    with hash_shuffle():
        per_doc = ds.map_batches(_doc_flags, batch_format="pyarrow").groupby(
            "doc_id", num_partitions=shuffle_partitions()).aggregate(
            ray.data.aggregate.Sum("conv", alias_name="conv"), ray.data.aggregate.Sum("raw_rows", alias_name="rows"),
            ray.data.aggregate.Sum("raw_tok", alias_name="tok"), ray.data.aggregate.Max("val", alias_name="val"))
        hit = per_doc.filter(expr="conv > 0 and rows > 0")
        out: dict[str, list[int]] = {}
        for r in hit.groupby("val").aggregate(ray.data.aggregate.Sum("rows", alias_name="rows"),
                                              ray.data.aggregate.Sum("tok", alias_name="tok")).iter_rows():
            out["val" if r["val"] else "train"] = [int(r["rows"]), int(r["tok"])]
    return out


BIN_BITS = 16
"""Phase B splits the key space into 2^16 bins: the driver sees one row per bin, whatever the corpus size."""


def _general_rows(uri: str, split: str) -> pa.Table:
    t = _narrow(uri, ["general"])
    t = t.filter(pc.equal(t["split"], split))
    return t.select(["key", "id", "n_tokens"]).append_column(
        "bin", pc.shift_right(t["key"], KEY_BITS - BIN_BITS)).append_column("tok", pc.add(t["n_tokens"], 1))


def _bin_sums(uri: str, split: str):
    """Ray task: a token part's general tokens of the split per key bin (a 2^16 array)."""
    import numpy as np

    t = _general_rows(uri, split)
    sums = np.zeros(1 << BIN_BITS, np.int64)
    np.add.at(sums, t["bin"].to_numpy(), t["tok"].to_numpy())
    return sums


def _add(*arrays):
    """Ray task: the sum of the parts' bin arrays."""
    return sum(arrays)


def general_threshold(parts: list[str], split: str, budget: int) -> dict | None:
    """The last general row of the split taken in (key, id) order within the budget: {key, id, room} (room =
    tokens kept of that row, None when whole), or None when every row fits.

    Two narrow passes instead of a global sort: a task per token part sums tokens per key bin and one task adds
    those arrays (one array of 2^16 bins reaches the driver), the driver finds the bin where the running sum
    crosses the budget, and only that bin's rows (~rows / 65536) are read back and walked in order. Ray tasks,
    not a Ray Data group-by: the same work, without a shuffle's fixed cost (~20 s per split on 2 cores)."""
    import ray

    if not parts:
        return None
    bin_sums = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_bin_sums)
    total = ray.get(ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_add).remote(*[bin_sums.remote(u, split) for u in parts]))
    bins = [(int(b), int(total[b])) for b in total.nonzero()[0]]
    have, cross = 0, None
    for b, tok in bins:
        if have + tok > budget:
            cross = b
            break
        have += tok
    if cross is None:
        return None
    bin_rows = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_bin_rows)

    def rows_of(b: int) -> list[tuple[int, str, int]]:
        tables = ray.get([bin_rows.remote(u, split, b) for u in parts])
        return sorted((int(k), str(i), int(n)) for t in tables
                      for k, i, n in zip(t["key"].to_pylist(), t["id"].to_pylist(), t["n_tokens"].to_pylist()))

    last = None
    for key, rid, n in rows_of(cross):
        if have + n + 1 <= budget:
            have += n + 1
            last = {"key": key, "id": rid, "room": None}
            continue
        room = budget - have - 1
        if room > 0:
            last = {"key": key, "id": rid, "room": room}
        break
    if last is None and have:  # nothing of the crossing bin fits: the threshold is the last row before it
        prev_bin = max(b for b, _ in bins if b < cross)
        k, i, _ = rows_of(prev_bin)[-1]
        last = {"key": k, "id": i, "room": None}
    return last or {"key": -1, "id": "", "room": None}


def _bin_rows(uri: str, split: str, bin: int) -> pa.Table:
    t = _general_rows(uri, split)
    return t.filter(pc.equal(t["bin"], bin)).select(["key", "id", "n_tokens"])


# ------------------------------------------------------------------------------------------------ phase C
def _bucketed(uri: str, plan: dict) -> pa.Table:
    """A token part's rows that phase C packs, with their split's bucket; general rows past the budget
    threshold are dropped and the crossing row cut; rows of finished buckets are skipped."""
    t = read_parquet(uri)
    parts = []
    for split in TRAIN_SPLITS:
        p = plan["splits"].get(split)
        if not p:
            continue
        s = t.filter(pc.equal(t["split"], split))
        thr = p["threshold"]
        if thr is not None and s.num_rows:
            keys, ids, kinds = s["key"].to_pylist(), s["id"].to_pylist(), s["kind"].to_pylist()
            keep, crossing = [], []
            for k, i, kind in zip(keys, ids, kinds):
                after = kind == "general" and (k, i) > (thr["key"], thr["id"])
                keep.append(not after)
                crossing.append(kind == "general" and thr["room"] is not None and (k, i) == (thr["key"], thr["id"]))
            if any(crossing):  # the crossing row, cut to the budget's remainder; the other rows stay in Arrow
                j = crossing.index(True)
                row = s.slice(j, 1)
                ids_j = pa.array([s["input_ids"][j].values.slice(0, thr["room"]).to_pylist()], pa.list_(pa.int32()))
                row = row.set_column(row.schema.get_field_index("input_ids"), "input_ids", ids_j)
                row = row.set_column(row.schema.get_field_index("n_tokens"), "n_tokens",
                                     pa.array([len(ids_j[0])], pa.int64()))
                s = pa.concat_tables([s.slice(0, j), row, s.slice(j + 1)])
            s = s.filter(pa.array(keep, pa.bool_()))
        n = p["buckets"]
        buckets = [(k * n) >> KEY_BITS for k in s["key"].to_pylist()]
        s = s.append_column("bucket", pa.array(buckets, pa.int64()))
        done = set(p["done"])
        if done:
            s = s.filter(pc.invert(pc.is_in(s["bucket"], value_set=pa.array(sorted(done), pa.int64()))))
        parts.append(s)
    if not parts:
        return pa.Table.from_pylist([], schema=TOKEN_SCHEMA.append(pa.field("bucket", pa.int64())))
    return pa.concat_tables(parts)


def pack_group(group: pa.Table, out_dir: str, seq_len: int, eos_id: int) -> pa.Table:
    """map_groups over one (split, bucket): sort, drop superseded raw rows, join with EOS, cut windows,
    write the part, then its marker. Returns one row of counts."""
    import numpy as np

    split, bucket = group["split"][0].as_py(), int(group["bucket"][0].as_py())
    g = group.sort_by([("key", "ascending"), ("id", "ascending")])
    converted = set(g.filter(pc.equal(g["kind"], "domain"))["doc_id"].to_pylist())
    superseded = pc.and_(pc.equal(g["kind"], "raw"), pc.is_in(g["doc_id"], value_set=pa.array(sorted(converted), pa.string())))
    n_superseded = int(pc.sum(superseded).as_py() or 0)
    g = g.filter(pc.invert(superseded))
    buf, ends = join_with_eos(g["input_ids"], eos_id)
    lens = np.diff(ends, prepend=0)
    starts = ends - lens
    total = len(buf)
    windows = cut(buf, seq_len)
    n_seq = len(windows)
    docs = g["doc_id"].to_pylist()
    doc_ids, j = [], 0
    for s in range(n_seq):
        lo, hi = s * seq_len, (s + 1) * seq_len
        while ends[j] <= lo:
            j += 1
        k, owners = j, []
        while k < len(docs) and starts[k] < hi:
            owners.append(docs[k])
            k += 1
        doc_ids.append(sorted(set(owners)))
    table = pa.table({"input_ids": windows_column(windows),
                      "sequence": pa.array([(bucket << 32) | i for i in range(n_seq)], pa.int64()),
                      "doc_ids": pa.array(doc_ids, pa.list_(pa.string()))}, schema=PACKED_SCHEMA)
    write_parquet_atomic(table, f"{out_dir}/packed/{split}/part-{bucket:05d}.parquet")
    kinds = g["kind"].to_pylist()
    counts = {"split": split, "bucket": bucket, "sequences": n_seq, "tokens_in": total,
              "waste": total - n_seq * seq_len, "raw_superseded": n_superseded,
              "rows": {k: kinds.count(k) for k in ("domain", "raw", "general")},
              "tokens": {k: int(lens[[x == k for x in kinds]].sum()) if kinds else 0 for k in ("domain", "raw", "general")}}
    write_json_atomic(f"{out_dir}/_markers/pack-{split}-{bucket:05d}.json", counts)
    return pa.table({"split": [split], "bucket": [bucket]})


def run_phase_c(cfg: Config, parts: list[str], plan: dict, eos_id: int) -> None:
    todo = sum(p["buckets"] - len(p["done"]) for p in plan["splits"].values())
    if not todo:
        return
    out = cfg.stage_dir(STAGE)
    with hash_shuffle():
        ds = map_files(parts, _bucketed, {"plan": plan})
        ds.groupby(["split", "bucket"], num_partitions=shuffle_partitions()).map_groups(
            pack_group, fn_kwargs={"out_dir": out, "seq_len": cfg.train.seq_len, "eos_id": eos_id},
            batch_format="pyarrow").materialize()


# ------------------------------------------------------------------------------------------------ run
def _tokenizer_facts(name: str) -> tuple[int | None, int]:
    from transformllm_ray.models.assets import load_tokenizer

    tok = load_tokenizer(name)
    return tok.eos_token_id, len(tok)


def run(cfg: Config) -> dict:
    t0 = time.time()
    out = cfg.stage_dir(STAGE)
    pc_ = cfg.pack
    seq_len = cfg.train.seq_len
    eos_id, vocab = _tokenizer_facts(cfg.pack_tokenizer)
    if eos_id is None:
        raise ValueError(f"tokenizer {cfg.pack_tokenizer} has no EOS token to join documents with")
    for d in ("_markers", "_tokens", "_decontam", "rejects", "packed/train", "packed/val"):
        makedirs(f"{out}/{d}")
        remove_temporaries(f"{out}/{d}")

    # A: tokenise, one unit per input file.
    units = plan_units(cfg)
    decon = prepare_decontamination(cfg, units) if pc_.decontaminate.enabled else {}
    say(f"[pack] tokenising {len(units)} files")
    ctor = {"cfg_json": cfg.model_dump_json(), "index_parts": [u["out"] for u in eval_sources(cfg)] if decon else [],
            "common_parts": decontam.common_parts(f"{out}/_decontam") if decon else []}
    counts = run_units(STAGE, units, TokenizeUnit, ctor, f"{out}/_markers",
                       pack_pool(cfg), env={"TOKENIZERS_PARALLELISM": "false"}, unit="files")
    parts = [token_part(cfg, u["unit_id"]) for u in units]
    rows_in = sum(int(c["rows_in"]) for c in counts)
    rejected: dict[str, int] = {}
    by: dict[str, list[int]] = {}
    contaminated: dict[str, int] = {}
    for c in counts:
        for k, v in json.loads(c["rejected"]).items():
            rejected[k] = rejected.get(k, 0) + v
        for k, v in json.loads(c["contaminated"]).items():
            contaminated[k] = contaminated.get(k, 0) + v
        for k, (n, tok) in json.loads(c["by"]).items():
            r = by.setdefault(k, [0, 0])
            r[0] += n
            r[1] += tok
    get = lambda kind, split: by.get(f"{kind}/{split}", [0, 0])  # noqa: E731

    # B: domain tokens per split (raw rows superseded by converted ones excluded), general budget.
    sup = superseded_raw(parts) if pc_.include_raw_chunks and any(get("domain", s)[0] for s in TRAIN_SPLITS) else {}
    plan: dict[str, Any] = {"splits": {}}
    for split in TRAIN_SPLITS:
        s_sup = sup.get(split, [0, 0])
        domain = get("domain", split)[1] + get("raw", split)[1] - s_sup[1]
        budget = int(round(pc_.mix_ratio * domain))
        general_have = get("general", split)[1]
        thr = general_threshold(parts, split, budget) if budget and general_have > budget else None
        general = min(budget, general_have) if pc_.mix_ratio > 0 else 0
        if not domain and not general:
            continue
        n_buckets = max(1, math.ceil((domain + general) / pc_.bucket_tokens))
        done = [b for b in range(n_buckets) if exists(f"{out}/_markers/pack-{split}-{b:05d}.json")]
        plan["splits"][split] = {"threshold": thr, "buckets": n_buckets, "done": done, "domain_tokens": domain,
                                 "general_tokens": general, "budget": budget, "general_have": general_have}
    if not plan["splits"]:
        raise ValueError("pack: no training text (no converted rows, no raw chunks, no general text)")
    finished = sum(len(p["done"]) for p in plan["splits"].values())
    if finished:
        say(f"[pack] resuming: {finished} buckets already packed")

    # C: pack every bucket not yet marked.
    run_phase_c(cfg, parts, plan, eos_id)

    # Counts from the bucket markers; parts of buckets outside this plan (an older run) are removed.
    marks = {}
    for split, p in plan["splits"].items():
        for b in range(p["buckets"]):
            m = f"{out}/_markers/pack-{split}-{b:05d}.json"
            if exists(m):
                marks[(split, b)] = read_json(m)
    for split in TRAIN_SPLITS:
        keep = {f"part-{b:05d}.parquet" for (s, b) in marks if s == split}
        for uri in list_files(f"{out}/packed/{split}", ".parquet"):
            if uri.rsplit("/", 1)[-1] not in keep:
                remove(uri)
    tot = lambda key, split=None: sum(m[key] for (s, _), m in marks.items() if split in (None, s))  # noqa: E731
    rows_packed = sum(sum(m["rows"].values()) for m in marks.values())
    general_in = sum(get("general", s)[0] for s in TRAIN_SPLITS)
    general_rows = sum(m["rows"]["general"] for m in marks.values())
    rejected["general_not_needed"] = general_in - general_rows
    rejected["raw_superseded"] = tot("raw_superseded")
    rejected = {k: v for k, v in sorted(rejected.items()) if v}
    domain_tokens = sum(m["tokens"]["domain"] + m["tokens"]["raw"] for m in marks.values())
    general_tokens = sum(m["tokens"]["general"] for m in marks.values())
    tokens_in = domain_tokens + general_tokens
    stats = {
        "rows_in": rows_in, "rows_out": rows_packed, "rows_rejected": sum(rejected.values()),
        "reject_reasons": rejected,
        "domain_rows": sum(m["rows"]["domain"] for m in marks.values()),
        "raw_rows": sum(m["rows"]["raw"] for m in marks.values()), "general_rows": general_rows,
        "tokens_in": tokens_in, "domain_tokens": domain_tokens, "general_tokens": general_tokens,
        "mix_ratio_target": pc_.mix_ratio,
        "mix_ratio_achieved": round(general_tokens / domain_tokens, 4) if domain_tokens else 0.0,
        "mix_by_split": {s: {"domain_tokens": p["domain_tokens"], "general_tokens": p["general_tokens"],
                             "general_budget": p["budget"], "general_available": p["general_have"]}
                         for s, p in plan["splits"].items()},
        "tokens_packed": tot("sequences") * seq_len, "waste_tokens": tot("waste"),
        "waste_fraction": round(tot("waste") / tokens_in, 6) if tokens_in else 0.0,
        "sequences_train": tot("sequences", "train"), "sequences_val": tot("sequences", "val"),
        "buckets": {s: p["buckets"] for s, p in plan["splits"].items()}, "files_tokenised": len(units),
        "seq_len": seq_len, "tokenizer": cfg.pack_tokenizer, "eos_token_id": eos_id, "vocab_size": vocab,
        "seed": cfg.seed, "seconds": round(time.time() - t0, 3),
    }
    if decon:
        stats["decontamination"] = {**decon, "rows_rejected": sum(contaminated.values()),
                                    "rows_rejected_by_kind": dict(sorted(contaminated.items()))}
    if not stats["sequences_train"]:
        raise ValueError(f"pack: {tokens_in} tokens make no full sequence of train.seq_len={seq_len}; convert "
                         "more chunks or lower train.seq_len")
    for split, p in plan["splits"].items():
        if pc_.mix_ratio > 0 and p["general_tokens"] < p["budget"]:
            log.warning("pack: general text of split %s ran out: %d general tokens < budget %d (mix_ratio %.3f x "
                        "%d domain tokens); add general text", split, p["general_tokens"], p["budget"],
                        pc_.mix_ratio, p["domain_tokens"])
    say(f"[pack] {stats['sequences_train']} train + {stats['sequences_val']} val sequences of {seq_len} "
        f"tokens, mix {stats['mix_ratio_achieved']}, waste {stats['waste_fraction']:.2%}")
    return write_stats(cfg, STAGE, stats)
