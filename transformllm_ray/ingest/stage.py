"""Ingest stage: raw files -> cleaned, de-duplicated, token-bounded chunks (`chunks/`) and `rejects/`.

    transformllm ingest --config configs/debug-local.yaml

Ingest is the only stage that reads raw files: the domain corpus (`input`) and the general text (`general`)
go through the same readers, cleaning, dedup and chunking; every chunk carries its `kind` (domain/general)
and its document's `split` (train/val/heldout, assigned here once: splits.py). Convert takes domain chunks
that are not held out, pack takes general chunks, eval takes held-out chunks.

Plan (driver). Input files are listed, sorted and cut into work shards of about `ingest.shard_bytes`: small
files are grouped; a large uncompressed JSONL file is cut into byte ranges (a piece yields the lines that start
in its range), a large Parquet file into runs of row groups; compressed files and whole-file text documents
are one piece each. A shard's id is a hash of its pieces, so the plan is the same on every rerun. The driver
holds the plan, O(shards), and reads nothing but the footers of large Parquet files.

Phase 1, on Ray Data. The shards flow through `ShardProcessor` actors (fixed pool, fractional CPUs so a
2-CPU machine does not deadlock): read with pyarrow filesystems (local, s3://, gs://), parse, normalise,
length-filter, hash, drop in-shard duplicates, chunk with the converter's tokenizer. Each shard writes
`chunks/part-<shard>.parquet`, `rejects/part-<shard>.parquet`, then `_markers/<shard>.json` (completion
marker, with its input count). A rerun after a kill skips marked shards and redoes only the rest; partial
files are temporaries that never get a final name, and names derive from shard ids, so a redo overwrites.

Phase 2, on Ray Data. Exact duplicates across shards: of all copies of a text the one with the smallest
(kind, input reference) is kept (domain before general, then file order and offset), the same choice phase 1
makes within a shard, so the result does not depend on how files were cut. A hash-partitioned group-by over
the documents' first chunks finds texts seen more than once and names the later copies, and a group-by on
the shard rewrites only the shards holding one (the copy moves to rejects/, idempotently).

Phase 3, on Ray Data (neardup.py, `ingest.near_dup`). Near-duplicates: phase 1 wrote each shard's MinHash
signatures (`minhash/part-<shard>.parquet`); LSH buckets, verified pairs and clusters move near-copies to
rejects/ as `near_duplicate` and give documents near each other one split. Counts are then
aggregated from the files themselves and `stats.json` is written last. Rows are input records (JSONL lines,
Parquet rows, text files, unreadable files): rows_in = rows_out (documents kept) + rows_rejected, exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from transformllm_ray.config import Config, SourceConfig
from transformllm_ray.console import say
from transformllm_ray.ingest import neardup
from transformllm_ray.dataops import UnitWorker, hash_shuffle, map_files, run_units, shuffle_partitions
from transformllm_ray.resources import ingest_pool
from transformllm_ray.schema import Chunk, Reject, make_reject, to_table
from transformllm_ray.sources.builtin import BUILTINS
from transformllm_ray.sources.readers import RawDoc, WorkFile, detect_format, is_compressed, read_file
from transformllm_ray.splits import assign_split
from transformllm_ray.stage import write_stats
from transformllm_ray.storage import (
    expand_inputs, files_digest, filesystem, list_files, makedirs, read_parquet, remove, remove_temporaries,
    write_parquet_atomic,
)
from transformllm_ray.text import content_id, normalize

log = logging.getLogger("transformllm")
STAGE = "ingest"


def inputs(cfg: Config) -> dict:
    """What ingest's output depends on (stage.py): both sources, cleaning, chunking (with the tokenizer it
    resolves), the shard plan (unit ids, and so resume, depend on shard_bytes) and the split assignment."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import section

    return {**section(cfg.input, "input", exclude=["expected_tokens"]), **section(cfg.general, "general"),
            "input.files": _listing(cfg, "domain"), "general.files": _listing(cfg, "general"),
            **section(cfg.ingest, "ingest", exclude=["tokenizer", "num_actors", "cpus_per_actor",
                                                     "near_dup.docs_per_partition"]),
            "ingest.tokenizer": model_key(cfg.ingest_tokenizer), **section(cfg.split, "split")}


def _listing(cfg: Config, kind: str) -> str:
    """files_digest of one source's input files."""
    from transformllm_ray.stage import remembered

    src = source_of(cfg, kind)
    return remembered("files:" + src.model_dump_json(), lambda: files_digest(source_files(src, kind)))
KINDS = ("domain", "general")
MIN_PIECE_BYTES = 4096
"""Smallest byte range a file is cut into, whatever ingest.shard_bytes says: below a few KB a piece costs more
in per-unit overhead (a marker, two part files) than reading it."""


# ------------------------------------------------------------------------------------------------ plan
def source_of(cfg: Config, kind: str) -> SourceConfig:
    return cfg.input if kind == "domain" else cfg.general


def list_work_files(cfg: Config) -> list[WorkFile]:
    """Every input file of both sources (domain first), each source sorted by name and cut at max_files."""
    return [f for kind in KINDS for f in source_files(source_of(cfg, kind), kind)]


def source_files(src: SourceConfig, kind: str) -> list[WorkFile]:
    if src.empty:
        return []
    found: list[WorkFile] = []
    if src.builtin:
        found += [dataclasses.replace(f, kind=kind) for f in BUILTINS[src.builtin]()]
    if src.paths:
        found += [WorkFile(f.uri, f.size, detect_format(f.uri, src.format), kind=kind)
                  for f in expand_inputs(src.paths)]
    found.sort(key=lambda f: f.name)
    return found[: src.max_files] if src.max_files else found


def _parquet_row_groups(f: WorkFile) -> list[int]:
    """Compressed bytes of each row group of a Parquet file ([] if its footer cannot be read: the reader
    then rejects the file as a whole)."""
    import pyarrow.parquet as pq

    try:
        fs, path = filesystem(f.uri)
        md = pq.ParquetFile(fs.open_input_file(path)).metadata
    except (pa.ArrowInvalid, OSError):
        return []
    return [sum(md.row_group(i).column(j).total_compressed_size for j in range(md.num_columns))
            for i in range(md.num_row_groups)]


def split_file(f: WorkFile, shard_bytes: int) -> list[tuple[WorkFile, int]]:
    """(piece, bytes) pieces of one file, each about shard_bytes where the format allows a cut."""
    if f.size <= shard_bytes or is_compressed(f.uri) or f.fmt not in ("jsonl", "parquet"):
        return [(f, f.size)]
    if f.fmt == "jsonl":
        step = max(shard_bytes, MIN_PIECE_BYTES)
        return [(dataclasses.replace(f, lo=a, hi=min(a + step, f.size)), min(step, f.size - a))
                for a in range(0, f.size, step)]
    groups = _parquet_row_groups(f)
    if len(groups) <= 1:
        return [(f, f.size)]
    # In file bytes, like every other piece: the footer and page headers spread over the row groups.
    scale = f.size / max(sum(groups), 1)
    sizes = [g * scale for g in groups]
    pieces, lo, size = [], 0, 0.0
    for i, g in enumerate(sizes):
        if i > lo and size + g > shard_bytes:  # close the run before it would overshoot
            pieces.append((dataclasses.replace(f, lo=lo, hi=i), round(size)))
            lo, size = i, 0.0
        size += g
    pieces.append((dataclasses.replace(f, lo=lo, hi=len(groups)), round(size)))
    return pieces


def plan_shards(files: list[WorkFile], shard_bytes: int) -> list[dict]:
    """Work shards of at most shard_bytes (or one larger piece): consecutive small files grouped, large files
    cut (split_file).
    id = hash of the member pieces (reference, size, kind, range)."""
    shards: list[list[WorkFile]] = []
    cur: list[WorkFile] = []
    size = 0
    for f in files:
        for piece, n in split_file(f, shard_bytes):
            if cur and size + n > shard_bytes:  # a shard stays within shard_bytes unless one piece is larger
                shards.append(cur)
                cur, size = [], 0
            cur.append(piece)
            size += n
    if cur:
        shards.append(cur)
    out = []
    for group in shards:
        key = "\n".join(f"{p.name}\t{p.size}\t{p.kind}\t{p.lo}\t{p.hi}" for p in group)
        h = hashlib.sha256(key.encode()).hexdigest()[:16]
        out.append({"unit_id": h, "files": json.dumps([p.__dict__ for p in group])})
    return out


# ------------------------------------------------------------------------------------------------ phase 1
class ShardProcessor(UnitWorker):
    """Ray Data stage: one work shard in (unit_id, files: JSON list of WorkFile pieces), one row of counts
    out; the shard's records go to its part files. __init__ loads the tokenizer once per actor."""

    input_columns: tuple[str, ...] = ("unit_id", "files")

    def __init__(self, marker_dir: str, cfg_json: str):
        from transformllm_ray.config import config_from_dict
        from transformllm_ray.ingest.chunking import Chunker
        from transformllm_ray.models.assets import load_fast_tokenizer

        super().__init__(marker_dir)
        self.cfg = config_from_dict(json.loads(cfg_json))
        self.chunker = Chunker(load_fast_tokenizer(self.cfg.ingest_tokenizer), self.cfg.ingest.chunk_tokens)

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        return process_shard(unit["unit_id"], unit["files"], self.cfg, self.chunker)


def process_shard(shard_id: str, files_json: str, cfg: Config, chunker) -> dict:
    """Process one shard: writes its chunks/rejects parts; returns its counts (the caller writes the marker)."""
    t0 = time.time()
    ic = cfg.ingest
    chunks: list[Chunk] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    kept: list[tuple[str, str, str, str]] = []  # (doc_id, source, kind, text) for the near-dup signatures
    rows_in = docs_out = 0
    for wf in (WorkFile(**d) for d in json.loads(files_json)):
        for rec in read_file(wf, source_of(cfg, wf.kind).text_field, ic.excerpt_chars):
            rows_in += 1
            if not isinstance(rec, RawDoc):
                rejects.append(rec)
                continue
            reason, detail, text = None, "", normalize(rec.text)
            if not text:
                reason, detail = "empty", "no text after normalisation"
            elif len(text) < ic.min_chars:
                reason, detail = "too_short", f"{len(text)} chars < ingest.min_chars={ic.min_chars}"
            elif len(text) > ic.max_chars:
                reason, detail = "too_long", f"{len(text)} chars > ingest.max_chars={ic.max_chars}"
            else:
                doc_id = content_id(text)
                if doc_id in seen:
                    reason, detail = "duplicate", f"same text as {seen[doc_id]}"
            if reason:
                rejects.append(make_reject(STAGE, rec.ref, reason, detail, text or rec.text, ic.excerpt_chars))
                continue
            seen[doc_id] = rec.ref
            docs_out += 1
            if ic.near_dup.enabled:
                kept.append((doc_id, rec.ref, wf.kind, text))
            meta = json.dumps(rec.metadata, sort_keys=True, default=str)
            split = assign_split(doc_id, cfg.split)
            for pos, (body, n) in enumerate(chunker.split(text)):
                chunks.append(Chunk(id=f"{doc_id}-{pos:04d}", doc_id=doc_id, source=rec.ref, kind=wf.kind,
                                    split=split, position=pos, text=body, n_tokens=n, metadata=meta))
    assert rows_in == docs_out + len(rejects)
    out = cfg.stage_dir(STAGE)
    t_sig = time.time()
    if ic.near_dup.enabled:
        write_parquet_atomic(neardup.signature_table(kept, ic.near_dup), f"{out}/minhash/part-{shard_id}.parquet")
    t_sig = time.time() - t_sig
    write_parquet_atomic(to_table(rejects, Reject), f"{out}/rejects/part-{shard_id}.parquet")
    write_parquet_atomic(to_table(chunks, Chunk), f"{out}/chunks/part-{shard_id}.parquet")
    return {"rows_in": rows_in, "docs_out": docs_out, "rejected": len(rejects), "chunks": len(chunks),
            "minhash_seconds": round(t_sig, 3), "seconds": round(time.time() - t0, 3)}


def run_phase1(cfg: Config, shards: list[dict], marker_dir: str) -> list[dict]:
    # Each actor tokenises on its own core; tokenizers' Rust thread pool on top would oversubscribe.
    return run_units(STAGE, shards, ShardProcessor, {"cfg_json": cfg.model_dump_json()}, marker_dir,
                     ingest_pool(cfg), env={"TOKENIZERS_PARALLELISM": "false"}, unit="shards")


# ------------------------------------------------------------------------------------------------ phase 2
def _first_chunks(uri: str) -> pa.Table:
    """A part file's documents (their first chunks) as (doc_id, order, shard): `order` sorts the copies of one
    text (domain before general, then input reference, i.e. file and offset), `shard` names the part."""
    t = read_parquet(uri, columns=["doc_id", "source", "kind", "position"])
    t = t.filter(pc.equal(t["position"], 0))
    shard = os.path.basename(uri)[len("part-"):-len(".parquet")]
    return pa.table({"doc_id": t["doc_id"], "order": neardup.copy_order(t["kind"], t["source"]),
                     "shard": pa.array([shard] * t.num_rows, pa.string())})


def _later_copies(group: pa.Table) -> pa.Table:
    """map_groups over the copies of one text: every copy but the first, with the first's reference."""
    if group.num_rows < 2:
        return group.slice(0, 0).append_column("keeper", pa.array([], pa.string()))
    group = group.sort_by("order")
    keeper = group["order"][0].as_py()[1:]
    later = group.slice(1)
    return later.append_column("keeper", pa.array([keeper] * later.num_rows, pa.string()))


def _drop_group(group: pa.Table, out_dir: str, excerpt_chars: int) -> pa.Table:
    """map_groups over one shard's later copies: move them from its chunks/ to its rejects/."""
    sid = group["shard"][0].as_py()
    moved = drop_duplicates(out_dir, sid, dict(zip(group["doc_id"].to_pylist(), group["keeper"].to_pylist())),
                            excerpt_chars)
    return pa.table({"shard": [sid], "moved": [moved]})


def cross_shard_dedup(cfg: Config, shard_ids: list[str]) -> int:
    """Move every later copy of a text seen in an earlier shard to rejects/; returns how many moved.

    Why a partitioned Ray Data step and not a set on the driver: the step sees one narrow row per document
    (~60 bytes: id, reference, shard), grouped by document id over the cluster's workers, and the driver
    receives one row per shard that held a copy. At 10x the presets' size (5B tokens, ~3M documents) that is
    ~200 MB of rows spread over the workers' object stores (spilled to disk if need be) and O(shards) rows on
    the driver, where a driver-side set would hold every hash at once. Both group-bys are hash shuffles
    (dataops.hash_shuffle): the rows live in aggregator actors, and the driver's memory stays flat."""
    out = cfg.stage_dir(STAGE)
    with hash_shuffle():
        firsts = map_files([f"{out}/chunks/part-{sid}.parquet" for sid in shard_ids], _first_chunks)
        if firsts is None:
            return 0
        n = shuffle_partitions()
        later = firsts.groupby("doc_id", num_partitions=n).map_groups(_later_copies, batch_format="pyarrow")
        moved = later.groupby("shard", num_partitions=n).map_groups(
            _drop_group, fn_kwargs={"out_dir": out, "excerpt_chars": cfg.ingest.excerpt_chars},
            batch_format="pyarrow")
        return sum(int(r["moved"]) for r in moved.iter_rows())


def drop_duplicates(out: str, sid: str, drop: dict[str, str], excerpt_chars: int) -> int:
    """Move the documents `drop` (doc_id -> keeper ref) of one shard from chunks/ to rejects/ (`duplicate`),
    idempotently (neardup.move_documents)."""
    return neardup.move_documents(out, sid, {d: f"same text as {k}" for d, k in drop.items()}, "duplicate",
                                  excerpt_chars)


# ------------------------------------------------------------------------------------------------ counts
def _part_counts(uri: str, rejects_dir: str) -> pa.Table:
    """One shard's counts, read back from its files: (kind, split, docs, chunks, tokens) rows, plus one
    (reason, count) row per reject reason under kind `reject`."""
    t = read_parquet(uri, columns=["kind", "split", "n_tokens", "position"])
    rows: dict[tuple[str, str], list[int]] = {}
    for kind, split, n, pos in zip(*(t[c].to_pylist() for c in ("kind", "split", "n_tokens", "position"))):
        r = rows.setdefault((kind, split), [0, 0, 0])
        r[0] += pos == 0
        r[1] += 1
        r[2] += n
    reasons: dict[str, int] = {}
    for reason in read_parquet(f"{rejects_dir}/{os.path.basename(uri)}", columns=["reason"])["reason"].to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    keys = list(rows) + [("reject", r) for r in reasons]
    vals = list(rows.values()) + [[0, c, 0] for c in reasons.values()]
    return pa.table({"kind": [k for k, _ in keys], "split": [s for _, s in keys], "docs": [v[0] for v in vals],
                     "chunks": [v[1] for v in vals], "tokens": [v[2] for v in vals]},
                    schema=pa.schema([("kind", pa.string()), ("split", pa.string()), ("docs", pa.int64()),
                                      ("chunks", pa.int64()), ("tokens", pa.int64())]))


def count_outputs(cfg: Config, shard_ids: list[str]) -> dict:
    """Documents, chunks and tokens by kind and split, and rejects by reason, read back from the files in
    workers (one small row per shard, kind and split reaches the driver)."""
    out = cfg.stage_dir(STAGE)
    by: dict[str, dict[str, dict[str, int]]] = {}
    reasons: dict[str, int] = {}
    ds = map_files([f"{out}/chunks/part-{sid}.parquet" for sid in shard_ids], _part_counts,
                   {"rejects_dir": f"{out}/rejects"})
    for r in ds.iter_rows() if ds is not None else []:
        if r["kind"] == "reject":
            reasons[r["split"]] = reasons.get(r["split"], 0) + int(r["chunks"])
            continue
        cur = by.setdefault(r["kind"], {}).setdefault(r["split"], {"docs": 0, "chunks": 0, "tokens": 0})
        for k in ("docs", "chunks", "tokens"):
            cur[k] += int(r[k])
    total = lambda k, kind=None: sum(v[k] for kd, s in by.items() if kind in (None, kd) for v in s.values())  # noqa: E731
    return {"docs_out": total("docs"), "chunks_out": total("chunks"), "tokens_out": total("tokens"),
            "domain_tokens": total("tokens", "domain"), "general_tokens": total("tokens", "general"),
            "by_kind_split": {k: dict(sorted(v.items())) for k, v in sorted(by.items())},
            "reject_reasons": dict(sorted(reasons.items()))}


def finalize(cfg: Config, shard_ids: list[str], docs: int) -> dict:
    """Cross-shard dedup, removal of parts from an older plan, and counts read back from the files."""
    out = cfg.stage_dir(STAGE)
    # Parts of shards not in this plan (the input changed since an earlier run) would be read as
    # output: remove them.
    keep = {f"part-{sid}.parquet" for sid in shard_ids}
    for sub in ("chunks", "rejects", "minhash"):
        for uri in list_files(f"{out}/{sub}", ".parquet"):
            if os.path.basename(uri) not in keep:
                remove(uri)
    moved = cross_shard_dedup(cfg, shard_ids)
    nd = cfg.ingest.near_dup
    near = neardup.run(out, shard_ids, nd, cfg.split, cfg.ingest.excerpt_chars, docs) if nd.enabled else None
    return {"cross_shard_duplicates_moved": moved, "near_dup": near, **count_outputs(cfg, shard_ids)}


def run(cfg: Config) -> dict:
    t0 = time.time()
    out = cfg.stage_dir(STAGE)
    marker_dir = f"{out}/_markers"
    for d in (marker_dir, f"{out}/chunks", f"{out}/rejects", f"{out}/minhash"):
        makedirs(d)
        remove_temporaries(d)

    files = list_work_files(cfg)
    shards = plan_shards(files, cfg.ingest.shard_bytes)
    say(f"[ingest] {len(files)} files in {len(shards)} shards")
    counts = run_phase1(cfg, shards, marker_dir)
    final = finalize(cfg, [s["unit_id"] for s in shards], sum(int(c["docs_out"]) for c in counts))
    if final["near_dup"]:
        # time in the actors computing signatures (phase 1), summed over shards
        final["near_dup"]["signature_seconds"] = round(sum(c["minhash_seconds"] for c in counts), 3)
        log.info("ingest: near-duplicates %s", final["near_dup"])
    reasons = final["reject_reasons"]
    stats = write_stats(cfg, STAGE, {
        "rows_in": sum(c["rows_in"] for c in counts), "rows_out": final.pop("docs_out"),
        "rows_rejected": sum(reasons.values()), "files": len(files), "shards": len(shards), **final,
        "tokenizer": cfg.ingest_tokenizer, "chunk_tokens": cfg.ingest.chunk_tokens,
        "seconds": round(time.time() - t0, 3),
    })
    return stats
