"""Near-duplicate documents: MinHash signatures per shard, LSH banding, verified pairs, clusters; near-copies
moved to rejects/ and one split per cluster. Ingest's phase 3 (stage.py), after exact dedup.

    transformllm ingest --config configs/debug-local.yaml       # on by default: ingest.near_dup

Similarity is the Jaccard similarity of two documents' sets of `shingle_words`-word shingles (lower-cased
words of the normalised text), estimated from MinHash signatures of `num_perm` permutations (rensa's
RMinHash: Rust, ~5x datasketch's documents/s on the licence corpus, benchmarks/RESULTS.md).

Phase 1 (stage.process_shard) writes each shard's signatures next to its chunks: `minhash/part-<shard>.parquet`
(doc_id, source, kind, sig). Then a map-reduce over Ray tasks, n partitions (one per
`near_dup.docs_per_partition` documents, at most one per CPU), the driver holding object references only
(map tasks x n), never a row:

1. map_shards, a task per group of shards (n groups): `bands` rows per document (band hash of `rows`
   signature values), partitioned by band hash; and the signatures, partitioned by document. Exact
   duplicates' later copies are left out.
2. bucket_pairs, a task per band partition: documents sharing a band hash are candidates; each bucket gives
   pairs from its first document (smallest order) to the others (a bucket of k gives k - 1 pairs),
   partitioned by the first document.
3. attach_first, a task per document partition: distinct pairs, the first document's signature attached,
   partitioned by the second document; verify, a task per partition: the estimated similarity from both
   signatures, pairs under `split_threshold` dropped, the rest written as `_near_dup/edges/part-<n>.parquet`.
   Every signature crosses the network twice, a pair once.
4. clusters, one task: union-find over the edges (memory O(documents that have a near-copy), never
   O(corpus)). Components of all edges share a split (that of the component's first document); in components
   of the edges at or above `remove_threshold` the first document is kept and the others are rejected as
   `near_duplicate`. It writes a label part per shard with a change.
5. apply_labels, a task per group of labelled shards (n groups): removed documents' chunks move to rejects/
   (with the kept document's reference and the estimated similarity), re-split documents get their
   cluster's split.
   Idempotent: the graph is built from every document that is not an exact duplicate, removed or not, so a
   rerun finds the same clusters, and a shard already rewritten is left as it is.

Why Ray tasks and not Ray Data group-bys: the shuffle here is small rows in, few rows out, and each Ray Data
group-by execution paid 2-5 s of fixed cost on 2 cores (aggregator actors, planning), 10-12 s for the two this
needs on the demo corpus against ~0.7 s for the whole of steps 1-5 as tasks (benchmarks/RESULTS.md). Tasks
keep what mattered from Ray Data: work on the workers, retries (Ray retries a task whose worker or node
died, and rebuilds lost outputs from lineage), and a driver that holds references only.

"First" is the order exact dedup uses (domain before general, then input reference), so the kept copy does not
depend on how files were cut into shards.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from transformllm_ray.ingest.config import NearDupConfig, SplitConfig
from transformllm_ray.dataops import shuffle_partitions
from transformllm_ray.resources import SHUFFLE_TASK_CPUS
from transformllm_ray.schema import Reject, make_reject, to_table
from transformllm_ray.storage import exists, list_files, makedirs, read_parquet, remove, write_parquet_atomic

log = logging.getLogger("transformllm")
STAGE = "ingest"
REASON = "near_duplicate"
SIG_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                        ("sig", pa.binary())])
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("a_order", pa.string()), ("a_shard", pa.string()),
                         ("b", pa.string()), ("b_order", pa.string()), ("b_shard", pa.string()),
                         ("sim", pa.float64())])
LABEL_SCHEMA = pa.schema([("doc_id", pa.string()), ("split", pa.string()), ("keeper", pa.string()),
                          ("sim", pa.float64())])


def shingles(text: str, k: int) -> list[str]:
    """The distinct k-word shingles of a text (lower-cased, split on whitespace); a text of fewer than k words
    is one shingle."""
    words = text.lower().split()
    if len(words) <= k:
        return [" ".join(words)]
    return list({" ".join(words[i:i + k]) for i in range(len(words) - k + 1)})


def signatures(texts: list[str], nd: NearDupConfig) -> list[bytes]:
    """MinHash signatures (num_perm uint32 values, as bytes) of texts."""
    import numpy as np
    from rensa import RMinHash

    digests = RMinHash.digests_from_token_sets([shingles(t, nd.shingle_words) for t in texts],
                                               num_perm=nd.num_perm, seed=nd.seed)
    return [np.asarray(d, dtype=np.uint32).tobytes() for d in digests]


def signature_table(docs: list[tuple[str, str, str, str]], nd: NearDupConfig) -> pa.Table:
    """docs: (doc_id, source, kind, text) of one shard's kept documents -> its minhash part."""
    sigs = signatures([d[3] for d in docs], nd) if docs else []
    return pa.table({"doc_id": [d[0] for d in docs], "source": [d[1] for d in docs],
                     "kind": [d[2] for d in docs], "sig": sigs}, schema=SIG_SCHEMA)


def estimated_jaccard(a: bytes, b: bytes) -> float:
    import numpy as np

    x, y = np.frombuffer(a, dtype=np.uint32), np.frombuffer(b, dtype=np.uint32)
    return float((x == y).mean())


def copy_order(kind: pa.ChunkedArray, source: pa.ChunkedArray) -> pa.ChunkedArray:
    """The order that picks the kept copy, in exact and near dedup alike: domain before general, then input
    reference (file and offset), so the choice does not depend on how files were cut into shards."""
    return pc.binary_join_element_wise(pc.if_else(pc.equal(kind, "domain"), "0", "1"), source, "")


def move_documents(out: str, shard: str, detail: dict[str, str], reason: str, excerpt_chars: int,
                   new_split: dict[str, str] | None = None) -> int:
    """Move the documents `detail` names (doc_id -> reject detail) of one shard from chunks/ to rejects/ under
    `reason`, and give the documents in `new_split` that split; returns how many moved.

    Idempotent under a kill between the two writes: rejects/ is written first and never gets the same
    (ref, reason) row twice; chunks/ is rewritten only while something in it changes."""
    chunks = read_parquet(f"{out}/chunks/part-{shard}.parquet")
    rejects = read_parquet(f"{out}/rejects/part-{shard}.parquet")
    is_gone = pc.is_in(chunks["doc_id"], value_set=pa.array(list(detail), pa.string()))
    firsts = chunks.filter(pc.and_(is_gone, pc.equal(chunks["position"], 0)))
    have = set(zip(rejects["ref"].to_pylist(), rejects["reason"].to_pylist()))
    extra = [make_reject(STAGE, src, reason, detail[d], txt, excerpt_chars)
             for d, src, txt in zip(*(firsts[c].to_pylist() for c in ("doc_id", "source", "text")))
             if (src, reason) not in have]
    if extra:
        write_parquet_atomic(pa.concat_tables([rejects, to_table(extra, Reject)]),
                             f"{out}/rejects/part-{shard}.parquet")
    kept = chunks.filter(pc.invert(is_gone))
    changed = firsts.num_rows > 0
    if new_split:
        splits = kept["split"].to_pylist()
        fixed = [new_split.get(d, s) for d, s in zip(kept["doc_id"].to_pylist(), splits)]
        if fixed != splits:
            i = kept.schema.get_field_index("split")  # the field itself: the Chunk schema's not-null must stay
            kept = kept.set_column(i, kept.schema.field(i), pa.array(fixed, pa.string()))
            changed = True
    if changed:
        write_parquet_atomic(kept, f"{out}/chunks/part-{shard}.parquet")
    return firsts.num_rows


# ------------------------------------------------------------------------------------------------ 1. map
_MUL = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the multiplier of Fibonacci hashing


def band_hashes(sig, bands: int, rows: int):
    """(docs, bands) uint64 hashes of each band's `rows` signature values, band index mixed in, so equal values
    in different bands never share a bucket. Vectorised over documents (a Python loop per band value cost
    more than the signatures); uint64 arithmetic wraps, as a hash wants."""
    import numpy as np

    v = sig[:, : bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
    with np.errstate(over="ignore"):
        h = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(_MUL), v.shape[:2]).copy()
        for j in range(rows):
            h = (h ^ v[:, :, j]) * np.uint64(_MUL)
            h ^= h >> np.uint64(29)
    return h


def _part_of(doc_ids: pa.Array, n: int):
    """Partition of each document id (a hex content hash) among n."""
    import numpy as np

    head = pc.utf8_slice_codeunits(doc_ids, 0, 8).to_numpy(zero_copy_only=False)
    return np.array([int(h, 16) for h in head], dtype=np.int64) % n if len(head) else np.zeros(0, np.int64)


def _split_by(t: pa.Table, part, n: int) -> list[pa.Table]:
    import numpy as np

    return [t.filter(pa.array(part == p)) if len(part) else t for p in np.arange(n)]


def _shard_docs(uri: str, rejects_dir: str) -> pa.Table:
    """One shard's minhash part, without the later copies of exact duplicates (moved to rejects/ by exact
    dedup: their text is the kept copy's), with a `shard` column."""
    shard = os.path.basename(uri)[len("part-"):-len(".parquet")]
    t = read_parquet(uri)
    rj = read_parquet(f"{rejects_dir}/part-{shard}.parquet", columns=["ref", "reason"])
    copies = rj.filter(pc.equal(rj["reason"], "duplicate"))["ref"]
    if len(copies):
        t = t.filter(pc.invert(pc.is_in(t["source"], value_set=copies)))
    return t.append_column("shard", pa.array([shard] * t.num_rows, pa.string()))


def map_shards(uris: list[str], rejects_dir: str, bands: int, rows: int, n: int) -> list[pa.Table]:
    """Some shards' minhash parts -> n tables of band rows (band, doc_id, order, shard) partitioned by band
    hash, then n tables of signatures (doc_id, sig) partitioned by document. Several shards a task: a task
    costs more than a small shard's work."""
    import numpy as np

    t = pa.concat_tables([_shard_docs(u, rejects_dir) for u in uris])
    sig = (np.frombuffer(b"".join(t["sig"].to_pylist()), dtype=np.uint32).reshape(t.num_rows, -1) if t.num_rows
           else np.zeros((0, bands * rows), np.uint32))
    hashes = band_hashes(sig, bands, rows)  # (docs, bands)
    order = copy_order(t["kind"], t["source"])
    which = pa.array(np.repeat(np.arange(t.num_rows), bands))
    b = pa.table({"band": pa.array(hashes.reshape(-1), pa.uint64()), "doc_id": t["doc_id"].take(which),
                  "order": order.take(which), "shard": t["shard"].take(which)})
    sigs = t.select(["doc_id", "sig"])
    return (_split_by(b, b["band"].to_numpy() % n, n) +
            _split_by(sigs, _part_of(sigs["doc_id"], n), n))


# ------------------------------------------------------------------------------------------------ 2. buckets
def _returns(tables: list[pa.Table]):
    """A task's n outputs: Ray stores a task with num_returns=1 as one object, so one table, not a list."""
    return tables if len(tables) > 1 else tables[0]


def bucket_pairs(n: int, *parts: pa.Table) -> list[pa.Table] | pa.Table:
    """One partition of band rows (every map's part for it) -> candidate pairs, n tables partitioned by the
    first document. In each bucket (rows with the same band hash) the pairs go from its first document
    (smallest order) to each other one: a bucket of k documents gives k - 1 pairs."""
    import numpy as np

    g = pa.concat_tables(parts).sort_by([("band", "ascending"), ("order", "ascending")])
    band = g["band"].to_numpy()
    idx = np.arange(len(band))
    starts = np.r_[True, band[1:] != band[:-1]] if len(band) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, idx, 0)) if len(band) else idx
    doc = g["doc_id"].to_numpy(zero_copy_only=False)
    keep = ~starts & (doc != doc[first]) if len(band) else np.zeros(0, bool)
    a, b = pa.array(first[keep], pa.int64()), pa.array(idx[keep], pa.int64())
    pairs = pa.table({"a": g["doc_id"].take(a), "a_order": g["order"].take(a), "a_shard": g["shard"].take(a),
                      "b": g["doc_id"].take(b), "b_order": g["order"].take(b), "b_shard": g["shard"].take(b)})
    return _returns(_split_by(pairs, _part_of(pairs["a"], n), n))


# ------------------------------------------------------------------------------------------------ 3. verify
def _signatures(parts) -> dict[str, bytes]:
    t = pa.concat_tables(parts)
    return dict(zip(t["doc_id"].to_pylist(), t["sig"].to_pylist()))


def attach_first(n: int, n_sig: int, *parts: pa.Table) -> list[pa.Table] | pa.Table:
    """The pairs whose first document is in one partition, distinct, with its signature (from the same
    partition's signature parts) -> n tables partitioned by the second document."""
    sigs = _signatures(parts[:n_sig])
    pairs = pa.concat_tables(parts[n_sig:])
    pairs = pairs.group_by(pairs.column_names, use_threads=False).aggregate([])  # distinct (a pair per band)
    pairs = pairs.append_column("a_sig", pa.array([sigs[a] for a in pairs["a"].to_pylist()], pa.binary()))
    return _returns(_split_by(pairs, _part_of(pairs["b"], n), n))


def verify(n_sig: int, edges_uri: str, threshold: float, *parts: pa.Table) -> dict[str, int]:
    """The pairs whose second document is in one partition: estimated similarity from both signatures; those
    at or above threshold are written to edges_uri. Returns (candidates, edges)."""
    sigs = _signatures(parts[:n_sig])
    pairs = pa.concat_tables(parts[n_sig:])
    sims = [estimated_jaccard(x, sigs[b]) for x, b in zip(pairs["a_sig"].to_pylist(), pairs["b"].to_pylist())]
    pairs = pairs.drop_columns(["a_sig"]).append_column("sim", pa.array(sims, pa.float64()))
    edges = pairs.filter(pc.greater_equal(pairs["sim"], threshold)).cast(EDGE_SCHEMA)
    write_parquet_atomic(edges, edges_uri)
    return {"candidates": pairs.num_rows, "edges": edges.num_rows}


# ------------------------------------------------------------------------------------------------ 4. clusters
class _Components:
    """Union-find whose root is always the member with the smallest order."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.order: dict[str, str] = {}

    def add(self, x: str, order: str) -> None:
        if x not in self.parent:
            self.parent[x], self.order[x] = x, order

    def find(self, x: str) -> str:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            if self.order[ry] < self.order[rx]:
                rx, ry = ry, rx
            self.parent[ry] = rx


def clusters(edges_dir: str, labels_dir: str, remove_threshold: float, split_json: str) -> dict[str, int]:
    """Union-find over every edge part; writes labels/part-<shard>.parquet for each shard with a document to
    remove or re-split; returns counts."""
    from transformllm_ray.config import SplitConfig as _Split
    from transformllm_ray.splits import assign_split

    split_cfg = _Split.model_validate_json(split_json)
    near, same = _Components(), _Components()
    shard_of: dict[str, str] = {}
    best: dict[str, float] = {}
    n_edges = 0
    for uri in sorted(list_files(edges_dir, ".parquet")):
        t = read_parquet(uri)
        for a, ao, ash, b, bo, bsh, sim in zip(*(t[c].to_pylist() for c in EDGE_SCHEMA.names)):
            n_edges += 1
            shard_of[a], shard_of[b] = ash, bsh
            for uf in (near, same):
                uf.add(a, ao)
                uf.add(b, bo)
            same.union(a, b)
            if sim >= remove_threshold:
                near.union(a, b)
                best[a], best[b] = max(best.get(a, 0.0), sim), max(best.get(b, 0.0), sim)
    by_shard: dict[str, list[tuple[str, str, str | None, float]]] = {}
    removed = resplit = 0
    sizes: dict[str, int] = {}
    for doc in same.parent:
        root = same.find(doc)
        sizes[root] = sizes.get(root, 0) + 1
        keeper = near.find(doc)
        gone = keeper != doc
        split = assign_split(root, split_cfg)
        if gone:
            removed += 1
        elif split != assign_split(doc, split_cfg):
            resplit += 1
        else:
            continue
        by_shard.setdefault(shard_of[doc], []).append(
            (doc, split, near.order[keeper][1:] if gone else None, best.get(doc, 0.0) if gone else 0.0))
    makedirs(labels_dir)
    for shard, rows in by_shard.items():
        t = pa.table({n: [r[i] for r in rows] for i, n in enumerate(LABEL_SCHEMA.names)}, schema=LABEL_SCHEMA)
        write_parquet_atomic(t, f"{labels_dir}/part-{shard}.parquet")
    return {"edges": n_edges, "documents_in_clusters": len(same.parent), "clusters": len(sizes),
            "largest_cluster": max(sizes.values(), default=0), "removed": removed, "resplit": resplit}


# ------------------------------------------------------------------------------------------------ 5. apply
def apply_labels(uris: list[str], out: str, excerpt_chars: int) -> int:
    """Some shards' labels, one shard after another (apply_shard_labels); returns how many documents moved."""
    return sum(apply_shard_labels(u, out, excerpt_chars) for u in uris)


def apply_shard_labels(uri: str, out: str, excerpt_chars: int) -> int:
    """One shard's labels: removed documents' chunks -> rejects/ (`near_duplicate`), re-split documents get
    their cluster's split (move_documents); returns how many moved."""
    shard = os.path.basename(uri)[len("part-"):-len(".parquet")]
    labels = read_parquet(uri)
    gone = labels.filter(pc.is_valid(labels["keeper"]))
    detail = {d: f"near-duplicate of {k} (estimated Jaccard {s:.2f})"
              for d, k, s in zip(*(gone[c].to_pylist() for c in ("doc_id", "keeper", "sim")))}
    return move_documents(out, shard, detail, REASON, excerpt_chars,
                          dict(zip(labels["doc_id"].to_pylist(), labels["split"].to_pylist())))


def partitions(docs: int, nd: NearDupConfig) -> int:
    """Partitions of the map-reduce: one per `docs_per_partition` documents, at most one per cluster CPU."""
    return max(1, min(shuffle_partitions(), -(-docs // nd.docs_per_partition)))


def run(out: str, shard_ids: list[str], nd: NearDupConfig, split: SplitConfig, excerpt_chars: int,
        docs: int) -> dict[str, Any]:
    """Phase 3 of ingest over the shards' minhash parts (`docs` documents kept by phase 1); the counts for
    stats.json. The driver holds object references (shards x partitions), never a row."""
    import time

    import ray

    t0 = time.time()
    work = f"{out}/_near_dup"
    for sub in ("edges", "labels"):  # derived from this run's parts only: rebuilt every run
        for uri in list_files(f"{work}/{sub}", ".parquet"):
            remove(uri)
        makedirs(f"{work}/{sub}")
    parts = [f"{out}/minhash/part-{s}.parquet" for s in shard_ids if exists(f"{out}/minhash/part-{s}.parquet")]
    n = partitions(docs, nd)
    task = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)
    # As many map (and apply) tasks as partitions: on a small corpus one worker process does it all, where
    # starting a worker per task would cost more than the work.
    per_task = max(1, -(-len(parts) // n))
    mapped = [task(map_shards).options(num_returns=2 * n).remote(parts[i:i + per_task], f"{out}/rejects", nd.bands,
                                                                 nd.rows, n)
              for i in range(0, len(parts), per_task)]
    band_parts = [[m[p] for m in mapped] for p in range(n)]
    sig_parts = [[m[n + p] for m in mapped] for p in range(n)]
    paired = [task(bucket_pairs).options(num_returns=n).remote(n, *band_parts[p]) for p in range(n)] if parts else []
    paired = [x if isinstance(x, list) else [x] for x in paired]
    first = [task(attach_first).options(num_returns=n).remote(n, len(sig_parts[q]), *sig_parts[q],
                                                              *[paired[p][q] for p in range(n)])
             for q in range(n)] if parts else []
    first = [x if isinstance(x, list) else [x] for x in first]
    t1 = time.time()
    checked = ray.get([task(verify).remote(len(sig_parts[q]), f"{work}/edges/part-{q:05d}.parquet",
                                           nd.split_threshold, *sig_parts[q], *[first[p][q] for p in range(n)])
                       for q in range(n)] if parts else [])
    t2 = time.time()
    counts = ray.get(task(clusters).remote(f"{work}/edges", f"{work}/labels", nd.remove_threshold,
                                           split.model_dump_json()))
    labelled = list_files(f"{work}/labels", ".parquet")
    per_task = max(1, -(-len(labelled) // n))  # none labelled: no task
    ray.get([task(apply_labels).remote(labelled[i:i + per_task], out, excerpt_chars)
             for i in range(0, len(labelled), per_task)])
    log.info("near-dup: submit %.2fs, map/bucket/verify %.2fs, clusters+apply %.2fs", t1 - t0, t2 - t1,
             time.time() - t2)
    return {"candidate_pairs": sum(c["candidates"] for c in checked), "pairs_verified": counts["edges"],
            "clusters": counts["clusters"], "documents_in_clusters": counts["documents_in_clusters"],
            "largest_cluster": counts["largest_cluster"], "removed": counts["removed"],
            "resplit": counts["resplit"], "partitions": n, "seconds": round(time.time() - t0, 3)}
