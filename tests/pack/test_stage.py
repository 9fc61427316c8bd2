"""Pack stage on real ingested licence text and real package docs (general), on a real local Ray:
determinism, the mix met to the token, no train/val/held-out leakage, EOS joins, token accounting, raw chunks
superseded by converted ones, and a kill -9 mid-stage whose rerun writes the same sequences."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import start_cli_and_kill, write_config
from tests.pack.conftest import GENERAL, INGEST, INPUT, SPLIT
from transformllm_ray.config import load_config
from transformllm_ray.pack import stage as pack
from transformllm_ray.stage import run_stage
from transformllm_ray.storage import list_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 128
PACK = {"include_raw_chunks": True, "mix_ratio": 0.5, "bucket_tokens": 20000}


def _config(base_cfg, tmp_path, name, seed=0, stages=("ingest",), **over):
    d = tmp_path / name
    for s in stages:
        shutil.copytree(f"{base_cfg.output_dir}/{s}", d / "out" / s)
    return write_config(d, input=INPUT, general=GENERAL, ingest=INGEST, split=SPLIT,
                        pack={**PACK, **over}, convert={"engine": "regex", "max_chunks": 30},
                        train={"seq_len": SEQ, "max_steps": 10, "warmup_steps": 1}, seed=seed)


def _pack(base_cfg, tmp_path, name, seed=0, **over):
    cfg = load_config(_config(base_cfg, tmp_path, name, seed, **over))
    return cfg, pack.run(cfg)


def _sequences(cfg, split="train"):
    """(sequence id, input_ids) of a packed split, in sequence order."""
    t = pq.read_table(f"{cfg.output_dir}/pack/packed/{split}").sort_by("sequence")
    return list(zip(t["sequence"].to_pylist(), t["input_ids"].to_pylist()))


@pytest.fixture(scope="module")
def packed(ingested, tmp_path_factory):
    """One pack of the default test config, which several tests read (a pack is ~30 s of set-up here)."""
    return _pack(ingested, tmp_path_factory.mktemp("packed"), "a")


def test_pack_is_deterministic_and_accounts_for_every_token(ingested, packed, tmp_path):
    cfg1, s1 = packed
    cfg2, s2 = _pack(ingested, tmp_path, "b")
    seqs = _sequences(cfg1)
    assert len(seqs) == s1["sequences_train"] > 10 and seqs == _sequences(cfg2)
    assert _sequences(cfg1, "val") == _sequences(cfg2, "val") and s1["sequences_val"] > 0
    assert all(len(x) == SEQ for _, x in seqs)
    assert s1["buckets"]["train"] >= 3  # several buckets, packed by several map_groups calls
    assert s1["tokens_in"] == s1["tokens_packed"] + s1["waste_tokens"]
    assert s1["waste_tokens"] < sum(s1["buckets"].values()) * SEQ  # at most one partial window per bucket
    assert s1["rows_in"] == s1["rows_out"] + s1["rows_rejected"]
    # Per split, the general row that crosses the budget is cut: the ratio is met to the rounding.
    for split, m in s1["mix_by_split"].items():
        assert m["general_tokens"] == m["general_budget"] == round(0.5 * m["domain_tokens"]), (split, m)
    assert abs(s1["general_tokens"] - 0.5 * s1["domain_tokens"]) <= 2, s1
    assert s1["general_rows"] > 0 and s1["reject_reasons"].get("general_not_needed", 0) > 0
    # A different seed gives a different order of the same text.
    cfg3, s3 = _pack(ingested, tmp_path, "c", seed=1)
    assert s3["domain_tokens"] == s1["domain_tokens"] and _sequences(cfg3) != seqs


def test_no_document_in_two_splits_and_held_out_never_packed(packed):
    cfg, stats = packed
    out = f"{cfg.output_dir}/pack"
    train_docs = {d for ds in pq.read_table(f"{out}/packed/train")["doc_ids"].to_pylist() for d in ds}
    val_docs = {d for ds in pq.read_table(f"{out}/packed/val")["doc_ids"].to_pylist() for d in ds}
    chunks = pq.read_table(f"{cfg.output_dir}/ingest/chunks").to_pylist()
    split_of = {c["doc_id"]: c["split"] for c in chunks}
    assert train_docs and val_docs and "heldout" in split_of.values()
    assert not train_docs & val_docs
    assert {split_of[d] for d in train_docs} == {"train"} and {split_of[d] for d in val_docs} == {"val"}


def test_documents_are_joined_with_eos(ingested, tmp_path):
    from transformllm_ray.models.assets import load_tokenizer

    cfg, stats = _pack(ingested, tmp_path, "eos", mix_ratio=0.0, decontaminate={"enabled": False})
    tok = load_tokenizer(cfg.pack_tokenizer)
    seqs = _sequences(cfg)
    buckets: dict[int, list[int]] = {}
    for sid, ids in seqs:  # each bucket's windows, in order, are one stream that starts with a whole text
        buckets.setdefault(sid >> 32, []).extend(ids)
    texts = {c["text"] for c in pq.read_table(f"{cfg.output_dir}/ingest/chunks").to_pylist()}
    assert len(buckets) >= 2
    for stream in buckets.values():
        first = stream[: stream.index(tok.eos_token_id)]
        second = stream[len(first) + 1:][: stream[len(first) + 1:].index(tok.eos_token_id)]
        assert tok.decode(first) in texts and tok.decode(second) in texts  # whole chunks, joined by EOS
    assert stats["general_rows"] == 0 and stats["reject_reasons"] == {}  # mix_ratio 0: no general text read


def test_pack_group_unit(tmp_path):
    rows = [("raw", "a", "a-0000", 2, [1, 2, 3]), ("domain", "b", "b-0000", 1, [4, 5]),
            ("raw", "b", "b-0001", 1, [9, 9]), ("general", "c", "c-0000", 3, [6])]
    g = pa.table({"kind": [r[0] for r in rows], "split": ["train"] * 4, "id": [r[2] for r in rows],
                  "doc_id": [r[1] for r in rows], "key": [r[3] for r in rows],
                  "n_tokens": [len(r[4]) for r in rows], "input_ids": [r[4] for r in rows],
                  "bucket": [7] * 4})
    pack.pack_group(g, str(tmp_path), seq_len=3, eos_id=0)
    t = pq.read_table(tmp_path / "packed/train/part-00007.parquet")
    # Order by key: b (converted; its raw chunk is superseded), a, c. Stream 4 5 0 1 2 3 0 6 0 -> 3 windows.
    assert t["input_ids"].to_pylist() == [[4, 5, 0], [1, 2, 3], [0, 6, 0]]
    assert t["doc_ids"].to_pylist() == [["b"], ["a"], ["a", "c"]]
    assert t["sequence"].to_pylist() == [(7 << 32) | i for i in range(3)]
    m = json.load(open(tmp_path / "_markers/pack-train-00007.json"))
    assert m["raw_superseded"] == 1 and m["waste"] == 0 and m["rows"] == {"domain": 1, "raw": 1, "general": 1}


def _check_raw_superseded(cfg, conv, stats):
    """Converted chunks replace the raw chunks of their whole document; raw chunks of other documents stay.
    Decontamination runs first, per row: a contaminated row is neither packed nor, if converted, superseding."""
    rejects = pq.read_table(f"{cfg.output_dir}/pack/rejects").to_pylist()
    contaminated = [r for r in rejects if r["reason"] == "contaminated"]
    assert len(contaminated) == stats["reject_reasons"]["contaminated"]
    dirty = {(r["detail"].split(" ", 1)[0], r["ref"]) for r in contaminated}  # detail: "<kind> text shares ..."
    converted = pq.read_table(f"{cfg.output_dir}/convert/converted").to_pylist()
    kept = [c for c in converted if ("domain", c["id"]) not in dirty]
    assert stats["domain_rows"] == len(kept) == conv["rows_out"] - sum(k == "domain" for k, _ in dirty) > 0
    conv_docs = {c["doc_id"] for c in kept}
    chunks = pq.read_table(f"{cfg.output_dir}/ingest/chunks").to_pylist()
    eligible_raw = [c for c in chunks if c["kind"] == "domain" and c["split"] != "heldout"
                    and ("raw", c["id"]) not in dirty]
    raw_of_converted = [c for c in eligible_raw if c["doc_id"] in conv_docs]
    assert stats["reject_reasons"]["raw_superseded"] == len(raw_of_converted) > 0
    assert stats["raw_rows"] == len(eligible_raw) - len(raw_of_converted) > 0
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]


def test_kill_mid_pack_then_rerun_gives_the_same_sequences(ingested, tmp_path):
    """kill -9 the pack job at a random moment (tokenising or packing), rerun: the same sequences as an
    uninterrupted run, which also shows raw chunks superseded by converted ones (one convert and pack less)."""
    ref_cfg = load_config(_config(ingested, tmp_path, "ref"))
    conv = run_stage(ref_cfg, "convert")  # `transformllm pack` packs a finished convert's output (stage.upstream)
    ref = pack.run(ref_cfg)
    _check_raw_superseded(ref_cfg, conv, ref)
    path = _config(ingested, tmp_path, "killed")
    cfg = load_config(path)
    shutil.copytree(f"{ref_cfg.output_dir}/convert", f"{cfg.output_dir}/convert")  # same inputs, same output
    markers = f"{cfg.output_dir}/pack/_markers"
    # Once the stage has started work (a marker exists), a random extra moment: tokenising or packing.
    start_cli_and_kill(["pack", "--config", path, "ray.num_cpus=2"], lambda: bool(list_files(markers, ".json")),
                       extra_delay=random.uniform(0.0, 3.0))
    assert not os.path.exists(f"{cfg.output_dir}/pack/stats.json")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "transformllm_ray.cli", "pack", "--config", path, "ray.num_cpus=2"]
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    stats = json.load(open(f"{cfg.output_dir}/pack/stats.json"))
    assert _sequences(cfg) == _sequences(ref_cfg) and _sequences(cfg, "val") == _sequences(ref_cfg, "val")
    drop = ("seconds",)
    assert {k: v for k, v in stats.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}


def test_missing_converted_text_is_a_clear_error(ingested, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `transformllm convert` first"):
        _pack(ingested, tmp_path, "noconv", include_raw_chunks=False)
