"""Near-duplicate benchmark: MinHash libraries, near-dup throughput, clusters, and held-out leakage before/after.

    .venv/bin/python -m benchmarks.dedup                        # the demo corpus (licence database + READMEs)
    .venv/bin/python -m benchmarks.dedup --scale-tokens 10e6    # also the scale benchmark's generated corpus

1. Libraries: signatures of the licence corpus' documents (5-word shingles, 128 permutations) with rensa's
   RMinHash and datasketch's MinHash, documents/s of each in this process (shingling included in both).
2. The ingest stage on the demo corpus (configs/debug-local.yaml's sources and split) twice in one local Ray:
   near-dup off (the baseline) and on. Near-dup throughput = documents / (phase 3's wall time + the phase 1
   signature time divided by the actors that shared it), both from the stage's stats.
3. Leakage, by brute force (exact Jaccard of 5-word shingle sets, every held-out document against every train
   or val document): held-out documents with a trainable one at >= 0.5, 0.8, 0.9, in each run.
4. Contamination, in each run: train/val chunks sharing a 13-word n-gram with a held-out chunk (what pack's
   decontamination rejects), with no cap on common n-grams, NeMo Curator's cap of 10 documents (our default),
   and a cap of 1; and the lookup's words/s.
5. With --scale-tokens: the ingest stage on the scale benchmark's corpus of that size (benchmarks/scale.py),
   near-dup on, its throughput and clusters.

Prints one JSON summary; record it in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def libraries(texts: list[str], repeats: int = 2) -> dict:
    import datasketch
    import numpy as np
    import rensa

    from transformllm_ray.ingest.neardup import shingles

    def with_rensa():
        sets = [shingles(t, 5) for t in texts]
        return rensa.RMinHash.digests_from_token_sets(sets, num_perm=128, seed=0)

    def with_datasketch():
        out = []
        for t in texts:
            m = datasketch.MinHash(num_perm=128, seed=0)
            m.update_batch([s.encode() for s in shingles(t, 5)])
            out.append(np.asarray(m.digest()))
        return out

    res = {}
    for name, fn in (("rensa", with_rensa), ("datasketch", with_datasketch)):
        best = min(_timed(fn) for _ in range(repeats))
        res[name] = {"seconds": round(best, 3), "docs_per_s": round(len(texts) / best, 1)}
    res["rensa_over_datasketch"] = round(res["rensa"]["docs_per_s"] / res["datasketch"]["docs_per_s"], 2)
    return res


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def leakage(out: str) -> dict:
    """Held-out documents with a train/val document at >= 0.5 / 0.8 / 0.9 exact Jaccard (chunks joined)."""
    import numpy as np
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    t = pq.read_table(f"{out}/ingest/chunks", columns=["doc_id", "position", "split", "text"]).to_pylist()
    docs: dict[str, list] = {}
    split: dict[str, str] = {}
    for r in t:
        docs.setdefault(r["doc_id"], []).append((r["position"], r["text"]))
        split[r["doc_id"]] = r["split"]
    ids = sorted(docs)
    vocab: dict[str, int] = {}
    rows, cols, size = [], [], []
    for i, d in enumerate(ids):
        w = " ".join(x for _, x in sorted(docs[d])).lower().split()
        s = {" ".join(w[k:k + 5]) for k in range(max(1, len(w) - 4))}
        size.append(len(s))
        for x in s:
            rows.append(i)
            cols.append(vocab.setdefault(x, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(ids), len(vocab)))
    held = np.array([split[d] == "heldout" for d in ids])
    inter = (m[held] @ m[~held].T).tocoo()
    hs, ts = np.array(size)[held], np.array(size)[~held]
    jac = inter.data / (hs[inter.row] + ts[inter.col] - inter.data)
    best = np.zeros(held.sum())
    np.maximum.at(best, inter.row, jac)
    return {"heldout_docs": int(held.sum()), "trainable_docs": int((~held).sum()),
            **{f"heldout_with_trainable_ge_{x}": int((best >= x).sum()) for x in (0.5, 0.8, 0.9)},
            "max_jaccard": round(float(best.max(initial=0.0)), 3)}


def contamination(out: str, n: int = 13, caps=(None, 10, 1)) -> dict:
    """Train/val chunks sharing an n-gram with a held-out chunk (pack's decontamination, pack/decontam.py), by
    kind, with eval n-grams found in more than `cap` training documents ignored (None: no cap); and the words/s
    of the lookup (hashing included) in this process."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transformllm_ray.pack.decontam import EvalIndex, NGramHasher, index_table, words

    t = pq.read_table(f"{out}/ingest/chunks", columns=["id", "doc_id", "kind", "split", "text"])
    held, train = t.filter(pc.equal(t["split"], "heldout")), t.filter(pc.not_equal(t["split"], "heldout"))
    path = f"{out}/eval-index.parquet"
    pq.write_table(index_table(zip(held["id"].to_pylist(), held["text"].to_pylist()), n), path)
    idx, h = EvalIndex.load([path]), NGramHasher(n)
    t0, n_words, rows = time.perf_counter(), 0, []
    for kind, doc, text in zip(train["kind"].to_pylist(), train["doc_id"].to_pylist(), train["text"].to_pylist()):
        ws = words(text)
        n_words += len(ws)
        rows.append((kind, doc, idx.hits(h.window_hashes(ws))))
    secs = time.perf_counter() - t0
    docs_of: dict[int, set] = {}
    for _, doc, hit in rows:
        for x in hit.tolist():
            docs_of.setdefault(x, set()).add(doc)
    res: dict = {"heldout_chunks": held.num_rows, "eval_ngrams": len(idx), "train_val_chunks":
                 {k: sum(r[0] == k for r in rows) for k in ("domain", "general")},
                 "lookup_words_per_s": round(n_words / secs)}
    for cap in caps:
        common = {x for x, d in docs_of.items() if cap is not None and len(d) > cap}
        hit = [r for r in rows if any(x not in common for x in r[2].tolist())]
        res[f"contaminated_max_matches_{cap}"] = {k: sum(r[0] == k for r in hit) for k in ("domain", "general")}
    return res


def ingest_run(cfg_dict: dict) -> dict:
    from transformllm_ray.config import config_from_dict
    from transformllm_ray.stage import run_stage

    cfg = config_from_dict(cfg_dict)
    t = time.time()
    stats = run_stage(cfg, "ingest")
    res = {"seconds": round(time.time() - t, 2), "docs_out": stats["rows_out"],
           "reject_reasons": stats["reject_reasons"], "near_dup": stats["near_dup"]}
    nd = stats["near_dup"]
    if nd:
        docs = stats["rows_out"] + nd["removed"]  # documents near-dup looked at (exact duplicates are not)
        wall = nd["seconds"] + nd["signature_seconds"] / cfg.ingest.num_actors
        res["near_dup_docs_per_s"] = round(docs / wall, 1)
        res["near_dup_docs"] = docs
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale-tokens", type=float, default=None)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    import ray
    import yaml

    from transformllm_ray.sources.builtin import BUILTINS
    from transformllm_ray.sources.readers import RawDoc, read_file
    from transformllm_ray.text import normalize

    work = args.dir or tempfile.mkdtemp(prefix="bench-dedup-")
    texts = [normalize(r.text) for wf in BUILTINS["licensedcode"]() for r in read_file(wf) if isinstance(r, RawDoc)]
    summary: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "licence_docs": len(texts)}
    summary["libraries"] = libraries(texts)
    print(f"[dedup] libraries: {summary['libraries']}", flush=True)

    demo = yaml.safe_load(open("configs/debug-local.yaml"))
    base = {"input": demo["input"], "general": demo["general"], "ingest": demo["ingest"], "split": demo["split"],
            "ray": {"num_cpus": 4}}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    try:
        for name, on in (("off", False), ("on", True)):
            cfg = {**base, "output_dir": f"{work}/demo-{name}",
                   "ingest": {**base["ingest"], "near_dup": {"enabled": on}}}
            res = ingest_run(cfg)
            res["leakage"] = leakage(f"{work}/demo-{name}")
            res["contamination_13_gram"] = contamination(f"{work}/demo-{name}")
            summary[f"demo_near_dup_{name}"] = res
            print(f"[dedup] demo, near-dup {name}: {json.dumps(res)}", flush=True)
        if args.scale_tokens:
            from benchmarks.scale import sentences, write_corpus

            tag = f"{args.scale_tokens:.0e}".replace("+", "")
            corpus = f"{work}/scale-{tag}"
            if not os.path.isdir(corpus):
                write_corpus(corpus, sentences("licensedcode"), args.scale_tokens, 0, "small", "Section")
            cfg = {"output_dir": f"{work}/scale-out-{tag}", "input": {"paths": [corpus]},
                   "general": {"builtin": None}, "ingest": {"chunk_tokens": 512}, "ray": {"num_cpus": 4}}
            res = ingest_run(cfg)
            summary[f"scale_{tag}"] = res
            print(f"[dedup] scale corpus {tag}: {json.dumps(res)}", flush=True)
    finally:
        ray.shutdown()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
