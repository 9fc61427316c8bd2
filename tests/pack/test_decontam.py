"""pack/decontam.py: n-gram hashing and the eval index as units; then pack on real ingested licence text and
package docs with a user's eval file planted in the training text, checked row by row against a brute-force
decontamination (word tuples, Python sets) of the same inputs."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from tests.helpers import write_config
from tests.pack.conftest import GENERAL, INGEST, INPUT, SPLIT
from transformllm_ray.config import load_config
from transformllm_ray.pack import stage as pack
from transformllm_ray.report import stage as report
from transformllm_ray.pack.decontam import EvalIndex, NGramHasher, index_table, words
from transformllm_ray.storage import list_files


def test_windows_ignore_case_punctuation_and_spacing():
    h = NGramHasher(3)
    a = h.window_hashes(words("The Software is PROVIDED, as is."))
    b = h.window_hashes(words("the software\n is provided as   is"))
    assert len(a) == 4 and (a == b).all() and len(set(a.tolist())) == 4
    assert len(h.window_hashes(words("two words"))) == 0  # fewer words than n: no window
    assert (NGramHasher(3).window_hashes(words("x y z")) == h.window_hashes(["x", "y", "z"])).all()  # stable


def test_index_names_the_first_item_and_finds_the_first_window(tmp_path):
    t = index_table([("q1", "alpha beta gamma delta"), ("q2", "beta gamma delta epsilon zeta")], 3)
    assert t.num_rows == 4  # "beta gamma delta" once, named by q1
    pq.write_table(t, tmp_path / "i.parquet")
    idx = EvalIndex.load([str(tmp_path / "i.parquet")])
    h = NGramHasher(3)
    assert idx.first_hit(h.window_hashes(words("zzz beta gamma delta epsilon"))) == (1, "q1")
    assert idx.first_hit(h.window_hashes(words("gamma delta epsilon zeta"))) == (0, "q2")
    assert idx.first_hit(h.window_hashes(words("alpha beta delta gamma"))) is None
    common = h.window_hashes(["beta", "gamma", "delta"])
    assert idx.without(common).first_hit(h.window_hashes(words("beta gamma delta epsilon"))) == (1, "q2")
    assert len(idx.hits(h.window_hashes(words("alpha beta gamma delta alpha beta gamma")))) == 2


# -------------------------------------------------------------------------------------------- pack, real text
N = 13
MAX_MATCHES = 3


def _grams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + N]) for i in range(len(w) - N + 1)}


def test_rows_sharing_an_eval_ngram_are_rejected_exactly_as_brute_force_finds(ingested, tmp_path):
    chunks = pq.read_table(f"{ingested.output_dir}/ingest/chunks").to_pylist()
    train = [c for c in chunks if c["split"] != "heldout"]
    held = [c for c in chunks if c["split"] == "heldout"]
    # A user's eval file: one item copies 20 words of a training chunk (a benchmark question lifted from the
    # corpus), one is unrelated, one is too short to hold an n-gram.
    victim = next(c for c in train if c["kind"] == "domain" and len(words(c["text"])) > 200)
    lifted = " ".join(words(victim["text"])[100:120])
    evals = tmp_path / "evals.jsonl"
    items = [{"text": "Who may sue under this licence? " + lifted}, {"text": "A question about nothing in the corpus "
             "at all, long enough to make several thirteen word windows of its own for the index"}, {"text": "short"}]
    evals.write_text("".join(json.dumps(i) + "\n" for i in items))
    d = tmp_path / "run"
    shutil.copytree(f"{ingested.output_dir}/ingest", d / "out" / "ingest")
    cfg = load_config(write_config(d, input=INPUT, general=GENERAL, ingest=INGEST, split=SPLIT,
                                   pack={"include_raw_chunks": True, "mix_ratio": 1.0,
                                         "decontaminate": {"max_matches": MAX_MATCHES}},
                                   eval={"decontaminate_paths": [str(evals)]}, train={"seq_len": 128}))
    stats = pack.run(cfg)

    # Brute force: every n-gram of the eval texts (held-out chunks, the file's records by their reference),
    # the training documents that hold each, the rows holding one found in at most MAX_MATCHES documents.
    offsets, pos = [], 0
    for i in items:
        offsets.append(pos)
        pos += len((json.dumps(i) + "\n").encode())
    eval_items = [(c["id"], c["text"]) for c in held] + [(f"{evals}#B{o:012d}", i["text"]) for o, i in zip(offsets, items)]
    owner: dict[tuple, str] = {}
    for ref, text in eval_items:
        for g in _grams(text):
            owner.setdefault(g, ref)
    docs_of: dict[tuple, set] = {}
    grams_of = {}
    for c in train:
        grams_of[c["id"]] = _grams(c["text"]) & owner.keys()
        for g in grams_of[c["id"]]:
            docs_of.setdefault(g, set()).add(c["doc_id"])
    expect = {cid for cid, gs in grams_of.items() if any(len(docs_of[g]) <= MAX_MATCHES for g in gs)}
    common = {g for g, ds in docs_of.items() if len(ds) > MAX_MATCHES}

    rejects = pq.read_table(f"{cfg.output_dir}/pack/rejects").to_pylist()
    got = {r["ref"] for r in rejects}
    assert got == expect and len(got) >= 5, (len(got), len(expect), sorted(got ^ expect)[:5])
    assert victim["id"] in got and common  # the lifted item, and boilerplate too common to count
    by_ref = {r["ref"]: r for r in rejects}
    assert f"eval item {evals}#B{offsets[0]:012d}" in by_ref[victim["id"]]["detail"]
    for r in rejects:  # the excerpt is the shared run of words, owned by the eval item the detail names
        g = tuple(r["excerpt"].split())
        assert r["reason"] == "contaminated" and len(g) == N and g in owner and g not in common
        assert r["detail"].endswith(f"eval item {owner[g]}"), r
    d_stats = stats["decontamination"]
    assert d_stats["rows_rejected"] == len(expect) == stats["reject_reasons"]["contaminated"]
    assert sum(d_stats["rows_rejected_by_kind"].values()) == len(expect)
    assert d_stats["common_ngrams_ignored"] == len(common) and d_stats["eval_ngrams_in_training"] == len(docs_of)
    assert d_stats["eval_files"] == 1 and d_stats["eval_items"] >= len(held) + 2
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    report.run(cfg)  # the data-quality table shows it
    md = open(f"{cfg.output_dir}/report/report.md").read()
    kinds = ", ".join(f"{k} {v:,}" for k, v in d_stats["rows_rejected_by_kind"].items())
    assert f"| training rows rejected as contaminated ({kinds}) | {len(expect):,} |" in md
    # Nothing rejected was packed: no packed sequence names a document all of whose rows were rejected.
    packed_docs = {x for ds in pq.read_table(f"{cfg.output_dir}/pack/packed/train")["doc_ids"].to_pylist() for x in ds}
    rows_of: dict[str, set] = {}
    for c in train:
        rows_of.setdefault(c["doc_id"], set()).add(c["id"])
    gone = {doc for doc, ids in rows_of.items() if ids <= got}
    assert gone and not gone & packed_docs


def test_a_bad_eval_file_is_a_clear_error(ingested, tmp_path):
    evals = tmp_path / "evals.jsonl"
    evals.write_text('{"question": "no text field here"}\n')
    d = tmp_path / "run"
    shutil.copytree(f"{ingested.output_dir}/ingest", d / "out" / "ingest")
    cfg = load_config(write_config(d, input=INPUT, general=GENERAL, ingest=INGEST, split=SPLIT,
                                   pack={"include_raw_chunks": True}, eval={"decontaminate_paths": [str(evals)]},
                                   train={"seq_len": 128}))
    with pytest.raises(Exception, match="evals.jsonl#B0+: wrong_schema.*decontaminate_text_field"):
        pack.run(cfg)
    assert not list_files(f"{cfg.output_dir}/pack/_markers", ".json")  # refused before any tokenising
