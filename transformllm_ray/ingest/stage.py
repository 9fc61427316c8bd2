"""Ingest stage: raw files -> cleaned, de-duplicated, token-bounded chunks (`chunks/`) and `rejects/`.

    transformllm ingest --config configs/debug-local.yaml

Plan. Input files (`input.paths`, `input.builtin`) are listed, sorted and grouped into work shards of about
`ingest.shard_bytes`; a shard's id is a hash of its files, so the plan is the same on every rerun.

Phase 1, on Ray Data. The shards flow through `ShardProcessor` actors (fixed pool, fractional CPUs so a
2-CPU machine does not deadlock): read with pyarrow filesystems (local, s3://, gs://), parse, normalise,
length-filter, hash, drop in-shard duplicates, chunk with the converter's tokenizer. Each shard writes
`chunks/part-<shard>.parquet`, `rejects/part-<shard>.parquet`, then `_markers/<shard>.json` (completion
marker, with its input count). A rerun after a kill skips marked shards and redoes only the rest; partial
files are temporaries that never get a final name, and names derive from shard ids, so a redo overwrites.

Phase 2, on the driver. Exact duplicates across shards: of all copies of a text, the one with the smallest
input reference (file order, then line) is kept, the same choice phase 1 makes within a shard, so the result
does not depend on how files were grouped. Only shards holding a later copy are rewritten (the duplicate
moves to rejects/, idempotently). Counts are then read back from the files themselves and `stats.json` is
written last. Rows are input records (JSONL lines, Parquet rows, text files, unreadable files):
rows_in = rows_out (documents kept) + rows_rejected, exactly.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from transformllm_ray.config import Config
from transformllm_ray.schema import Chunk, Reject, make_reject, to_table
from transformllm_ray.sources.builtin import BUILTINS
from transformllm_ray.sources.readers import RawDoc, WorkFile, detect_format, read_file
from transformllm_ray.stage import write_stats
from transformllm_ray.storage import (
    exists, expand_inputs, list_files, makedirs, read_json, read_parquet, remove, remove_temporaries,
    write_json_atomic, write_parquet_atomic,
)
from transformllm_ray.text import content_id, normalize

log = logging.getLogger("transformllm")
STAGE = "ingest"


# ------------------------------------------------------------------------------------------------ plan
def list_work_files(cfg: Config) -> list[WorkFile]:
    files: list[WorkFile] = []
    if cfg.input.builtin:
        files += BUILTINS[cfg.input.builtin]()
    if cfg.input.paths:
        files += [WorkFile(f.uri, f.size, detect_format(f.uri, cfg.input.format))
                  for f in expand_inputs(cfg.input.paths)]
    files.sort(key=lambda f: f.name)
    if cfg.input.max_files:
        files = files[: cfg.input.max_files]
    return files


def plan_shards(files: list[WorkFile], shard_bytes: int) -> list[dict]:
    """Group consecutive files into shards of ~shard_bytes; id = hash of member refs and sizes."""
    shards, cur, size = [], [], 0
    for f in files:
        cur.append(f)
        size += f.size
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    out = []
    for group in shards:
        h = hashlib.sha256("\n".join(f"{f.name}\t{f.size}" for f in group).encode()).hexdigest()[:16]
        out.append({"shard_id": h, "files": json.dumps([f.__dict__ for f in group])})
    return out


# ------------------------------------------------------------------------------------------------ phase 1
class ShardProcessor:
    """Ray Data stage: one work shard in, one row of counts out (the shard's records go to its work files).

    Input columns: shard_id, files (JSON list of WorkFile). __init__ loads the tokenizer once per actor.
    """

    input_columns = ("shard_id", "files")

    def __init__(self, cfg_json: str, marker_dir: str):
        from transformllm_ray.config import config_from_dict
        from transformllm_ray.ingest.chunking import Chunker
        from transformllm_ray.models.assets import load_fast_tokenizer

        self.cfg = config_from_dict(json.loads(cfg_json))
        self.marker_dir = marker_dir
        self.chunker = Chunker(load_fast_tokenizer(self.cfg.ingest_tokenizer), self.cfg.ingest.chunk_tokens)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        missing = [c for c in self.input_columns if c not in batch]
        if missing:
            raise KeyError(f"ShardProcessor needs columns {missing}")
        rows = [process_shard(sid, files, self.cfg, self.chunker, self.marker_dir)
                for sid, files in zip(batch["shard_id"], batch["files"])]
        assert len(rows) == len(batch["shard_id"]), "one output row per input row"
        return {k: [r[k] for r in rows] for k in rows[0]}


def process_shard(shard_id: str, files_json: str, cfg: Config, chunker, marker_dir: str) -> dict:
    """Process one shard (unless its marker exists); writes its chunks/rejects parts; returns its counts."""
    marker = f"{marker_dir}/{shard_id}.json"
    if exists(marker):
        return read_json(marker)
    t0 = time.time()
    ic = cfg.ingest
    chunks: list[Chunk] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    rows_in = docs_out = 0
    for wf in (WorkFile(**d) for d in json.loads(files_json)):
        for rec in read_file(wf, cfg.input.text_field, ic.excerpt_chars):
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
            meta = json.dumps(rec.metadata, sort_keys=True, default=str)
            for pos, (body, n) in enumerate(chunker.split(text)):
                chunks.append(Chunk(id=f"{doc_id}-{pos:04d}", doc_id=doc_id, source=rec.ref, position=pos,
                                    text=body, n_tokens=n, metadata=meta))
    assert rows_in == docs_out + len(rejects)
    out = cfg.stage_dir(STAGE)
    write_parquet_atomic(to_table(rejects, Reject), f"{out}/rejects/part-{shard_id}.parquet")
    write_parquet_atomic(to_table(chunks, Chunk), f"{out}/chunks/part-{shard_id}.parquet")
    counts = {"shard_id": shard_id, "rows_in": rows_in, "docs_out": docs_out, "rejected": len(rejects),
              "chunks": len(chunks), "seconds": round(time.time() - t0, 3)}
    write_json_atomic(marker, counts)
    return counts


def run_phase1(cfg: Config, shards: list[dict], marker_dir: str) -> list[dict]:
    import ray

    pending = [s for s in shards if not exists(f"{marker_dir}/{s['shard_id']}.json")]
    done = [read_json(f"{marker_dir}/{s['shard_id']}.json") for s in shards if s not in pending]
    if done:
        print(f"[ingest] resuming: {len(done)}/{len(shards)} shards already done", flush=True)
    if not pending:
        return done
    ic = cfg.ingest
    n_actors = min(ic.num_actors, len(pending))
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(
        ShardProcessor,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "marker_dir": marker_dir},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=ic.cpus_per_actor,
        # Each actor tokenises on its own core; tokenizers' Rust thread pool on top would oversubscribe.
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    return done + list(ds.iter_rows())


# ------------------------------------------------------------------------------------------------ phase 2
def cross_shard_duplicates(chunk_dir: str, shard_ids: list[str]) -> dict[str, dict[str, str]]:
    """{shard_id: {doc_id: keeper_ref}} for documents whose text also appears earlier in another shard."""
    firsts: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for sid in shard_ids:
        t = read_parquet(f"{chunk_dir}/part-{sid}.parquet", columns=["doc_id", "source", "position"])
        t = t.filter(pc.equal(t["position"], 0))
        for doc_id, src in zip(t["doc_id"].to_pylist(), t["source"].to_pylist()):
            firsts[doc_id].append((src, sid))
    losers: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for doc_id, copies in firsts.items():
        if len(copies) > 1:
            copies.sort()
            for src, sid in copies[1:]:
                losers[sid][doc_id] = copies[0][0]
    return losers


def drop_duplicates(cfg: Config, sid: str, drop: dict[str, str]) -> None:
    """Move the documents `drop` (doc_id -> keeper ref) of one shard from chunks/ to rejects/.

    Idempotent under a kill between the two writes: rejects/ is written first and never gets the same
    (ref, duplicate) row twice; chunks/ is rewritten only while it still holds the documents.
    """
    out = cfg.stage_dir(STAGE)
    chunks = read_parquet(f"{out}/chunks/part-{sid}.parquet")
    rejects = read_parquet(f"{out}/rejects/part-{sid}.parquet")
    is_dup = pc.is_in(chunks["doc_id"], value_set=pa.array(list(drop)))
    dups = chunks.filter(pc.and_(is_dup, pc.equal(chunks["position"], 0)))
    have = {(r, c) for r, c in zip(rejects["ref"].to_pylist(), rejects["reason"].to_pylist())}
    extra = [make_reject(STAGE, src, "duplicate", f"same text as {drop[d]}", txt, cfg.ingest.excerpt_chars)
             for d, src, txt in zip(dups["doc_id"].to_pylist(), dups["source"].to_pylist(),
                                    dups["text"].to_pylist()) if (src, "duplicate") not in have]
    write_parquet_atomic(pa.concat_tables([rejects, to_table(extra, Reject)]), f"{out}/rejects/part-{sid}.parquet")
    write_parquet_atomic(chunks.filter(pc.invert(is_dup)), f"{out}/chunks/part-{sid}.parquet")


def finalize(cfg: Config, shard_ids: list[str]) -> dict:
    """Cross-shard dedup, removal of parts from an older plan, and counts read back from the files."""
    out = cfg.stage_dir(STAGE)
    for sid, drop in cross_shard_duplicates(f"{out}/chunks", shard_ids).items():
        drop_duplicates(cfg, sid, drop)
    # Parts of shards not in this plan (the input changed since an earlier run) would be read as
    # output: remove them.
    keep = {f"part-{sid}.parquet" for sid in shard_ids}
    for sub in ("chunks", "rejects"):
        for uri in list_files(f"{out}/{sub}", ".parquet"):
            if os.path.basename(uri) not in keep:
                remove(uri)
    chunks = read_parquet([f"{out}/chunks/part-{sid}.parquet" for sid in shard_ids],
                          columns=["doc_id", "n_tokens"])
    reasons = collections.Counter(read_parquet([f"{out}/rejects/part-{sid}.parquet" for sid in shard_ids],
                                               columns=["reason"])["reason"].to_pylist())
    return {"docs_out": len(pc.unique(chunks["doc_id"])), "chunks_out": chunks.num_rows,
            "tokens_out": int(pc.sum(chunks["n_tokens"]).as_py() or 0),
            "reject_reasons": dict(sorted(reasons.items()))}


def run(cfg: Config) -> dict:
    t0 = time.time()
    out = cfg.stage_dir(STAGE)
    marker_dir = f"{out}/_markers"
    for d in (marker_dir, f"{out}/chunks", f"{out}/rejects"):
        makedirs(d)
        remove_temporaries(d)

    files = list_work_files(cfg)
    shards = plan_shards(files, cfg.ingest.shard_bytes)
    print(f"[ingest] {len(files)} files in {len(shards)} shards", flush=True)
    counts = run_phase1(cfg, shards, marker_dir)
    final = finalize(cfg, [s["shard_id"] for s in shards])
    reasons = final["reject_reasons"]
    stats = write_stats(cfg, STAGE, {
        "rows_in": sum(c["rows_in"] for c in counts), "rows_out": final["docs_out"],
        "rows_rejected": sum(reasons.values()), "reject_reasons": reasons, "files": len(files),
        "shards": len(shards), "chunks_out": final["chunks_out"], "tokens_out": final["tokens_out"],
        "tokenizer": cfg.ingest_tokenizer, "chunk_tokens": cfg.ingest.chunk_tokens,
        "seconds": round(time.time() - t0, 3),
    })
    return stats
