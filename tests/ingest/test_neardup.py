"""Near-duplicates in ingest on the demo corpus (the licence database and package READMEs), checked against
brute-force Jaccard: no held-out document has a trainable near-copy, removal's precision and recall, planted
near-copies removed naming the kept document, counts reconcile, a second pass changes nothing."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.ingest.config import NearDupConfig
from transformllm_ray.ingest import neardup
from transformllm_ray.ingest import stage as ingest
from transformllm_ray.sources.readers import RawDoc, read_file
from transformllm_ray.text import normalize

K = 5  # shingle words, as ingest.near_dup.shingle_words


def word_shingles(text: str) -> set[str]:
    """Our own brute-force shingling (not neardup.shingles): lower-cased words, K at a time."""
    w = text.lower().split()
    return {" ".join(w[i:i + K]) for i in range(max(1, len(w) - K + 1))}


def all_pairs_jaccard(sets: list[set[str]], floor: float) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair of sets at or above floor (i < j), by a sparse product: each pair's
    intersection size is counted exactly."""
    import numpy as np
    import scipy.sparse as sp

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sets):
        for x in s:
            rows.append(i)
            cols.append(vocab.setdefault(x, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(sets), len(vocab)))
    inter = (m @ m.T).tocoo()
    size = np.array([len(s) for s in sets])
    out = {}
    for i, j, n in zip(inter.row, inter.col, inter.data):
        if i < j:
            jac = n / (size[i] + size[j] - n)
            if jac >= floor:
                out[(int(i), int(j))] = float(jac)
    return out


def test_estimate_follows_true_jaccard(legal_texts):
    """On real licence pairs the MinHash estimate is within 0.15 of the exact Jaccard (3.4 standard errors at
    128 permutations)."""
    nd = NearDupConfig()
    texts = [normalize(t) for t in legal_texts[:120]]
    sigs = neardup.signatures(texts, nd)
    exact = all_pairs_jaccard([set(neardup.shingles(t, K)) for t in texts], 0.2)
    assert len(exact) >= 5
    for (i, j), jac in exact.items():
        assert abs(neardup.estimated_jaccard(sigs[i], sigs[j]) - jac) < 0.15, (i, j, jac)
    assert set(neardup.shingles("A b c d e F", 5)) == {"a b c d e", "b c d e f"}
    assert neardup.shingles("Too short", 5) == ["too short"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, legal_texts):
    """Near-copies of four real licences, ~1% of their words replaced (Jaccard ~0.95 on 5-word shingles), as
    one JSONL file read beside the builtin corpus; and the originals' normalised texts."""
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("planted")
    lines, origs = [], []
    for t in [t for t in legal_texts if 3000 < len(t) < 8000][:4]:
        w = t.split()
        for i in rng.sample(range(len(w)), max(1, len(w) // 100)):  # ~1% of words: Jaccard ~0.95
            w[i] = "zzplanted"
        lines.append(json.dumps({"text": " ".join(w)}))
        origs.append(normalize(t))
    (d / "copies.jsonl").write_text("\n".join(lines) + "\n")
    return d / "copies.jsonl", origs


def test_demo_corpus_no_heldout_leakage(ray_local, tmp_path, planted):
    copies, origs = planted
    cfg = load_config(write_config(
        tmp_path, input={"builtin": "licensedcode", "paths": [str(copies)]}, general={"builtin": "package-docs"},
        ingest={"chunk_tokens": 512, "shard_bytes": 1_000_000, "tokenizer": "builtin:smollm2-135m-instruct"},
        split={"heldout_fraction": 0.05, "val_fraction": 0.2}))
    stats = ingest.run(cfg)
    out = cfg.stage_dir("ingest")
    nd = stats["near_dup"]
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    assert stats["reject_reasons"]["near_duplicate"] == nd["removed"] > 0

    # Every input document's normalised text by reference, read back as ingest read it.
    texts: dict[str, str] = {}
    for wf in ingest.list_work_files(cfg):
        for rec in read_file(wf):
            if isinstance(rec, RawDoc):
                texts.setdefault(rec.ref, normalize(rec.text))
    chunks = pq.read_table(f"{out}/chunks", columns=["source", "split", "position"]).to_pylist()
    kept = {r["source"]: r["split"] for r in chunks if r["position"] == 0}
    rejects = pq.read_table(f"{out}/rejects").to_pylist()
    removed = {r["ref"]: r["detail"] for r in rejects if r["reason"] == "near_duplicate"}

    # 1. No held-out document has a trainable (train or val) document at Jaccard >= 0.5.
    refs = sorted(kept)
    sh = [word_shingles(texts[r]) for r in refs]
    pairs = all_pairs_jaccard(sh, 0.5)
    leaks = [(refs[i], refs[j], jac) for (i, j), jac in pairs.items()
             if (kept[refs[i]] == "heldout") != (kept[refs[j]] == "heldout")]
    assert sum(s == "heldout" for s in kept.values()) > 50
    assert not leaks, leaks[:5]

    # 2. The planted near-copies: one of each pair is kept, the other rejected naming it.
    planted_refs = [r for r in texts if r.startswith(str(copies))]
    assert len(planted_refs) == len(origs)
    for orig in origs:
        ref_o = next(r for r, t in texts.items() if t == orig and r.startswith("licensedcode-data"))
        ref_c = max(planted_refs, key=lambda r: len(word_shingles(texts[r]) & word_shingles(orig)))
        gone, stays = (ref_o, ref_c) if ref_o in removed else (ref_c, ref_o)
        assert gone in removed and stays not in removed, (ref_o, ref_c)
        assert removed[gone].startswith(f"near-duplicate of {stays} (estimated Jaccard "), removed[gone]
        assert float(removed[gone].rsplit(" ", 1)[1].rstrip(")")) >= 0.8, removed[gone]

    # 3. Removal against brute force over every document that exact dedup left (kept or near-dup removed):
    #    recall = pairs at Jaccard >= 0.8 of which only one document is kept; precision = removed documents
    #    whose named kept document is within 0.1 of the threshold (the estimate's ~2 standard errors).
    cand = sorted(set(kept) | set(removed))
    idx = {r: i for i, r in enumerate(cand)}
    exact = all_pairs_jaccard([word_shingles(texts[r]) for r in cand], 0.5)
    truth = [(a, b) for (a, b), jac in exact.items() if jac >= 0.8]
    recall = sum(cand[a] in removed or cand[b] in removed for a, b in truth) / len(truth)
    keeper = {r: d.split("near-duplicate of ")[1].rsplit(" (", 1)[0] for r, d in removed.items()}
    close = [exact.get(tuple(sorted((idx[r], idx[k]))), 0.0) >= 0.7 for r, k in keeper.items()]
    precision = sum(close) / len(close)
    print(f"near-dup on the demo corpus: {len(truth)} pairs >= 0.8, recall {recall:.3f}, "
          f"precision {precision:.3f} ({len(removed)} removed)")
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)

    # Rewritten parts keep the table's schema (its not-null fields too: Arrow refuses to concatenate otherwise).
    from transformllm_ray.schema import Chunk, arrow_schema
    from transformllm_ray.storage import list_files

    for part in list_files(f"{out}/chunks", ".parquet"):
        assert pq.read_schema(part).remove_metadata() == arrow_schema(Chunk).remove_metadata(), part

    # 4. A second pass, its map-reduce cut into 4 partitions instead of 1, finds the same clusters and changes
    # nothing.
    before = (pq.read_table(f"{out}/chunks").sort_by("id"), pq.read_table(f"{out}/rejects").sort_by("ref"))
    again = neardup.run(out, [s["unit_id"] for s in ingest.plan_shards(ingest.list_work_files(cfg),
                                                                       cfg.ingest.shard_bytes)],
                        cfg.ingest.near_dup.model_copy(update={"docs_per_partition": 300}), cfg.split,
                        cfg.ingest.excerpt_chars, stats["rows_in"])
    assert nd["partitions"] == 1 and again["partitions"] == 4  # 2,000+ documents, 300 a partition, 4 CPUs
    timing = ("seconds", "signature_seconds", "partitions")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in nd.items() if k not in timing}
    after = (pq.read_table(f"{out}/chunks").sort_by("id"), pq.read_table(f"{out}/rejects").sort_by("ref"))
    assert before[0].equals(after[0]) and before[1].equals(after[1])
