"""Eval stage on a real tiny model: both models scored on the same tokens; a changed model scores differently."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.eval import stage as evaluate


def _setup(tmp_path, tiny_model, legal_texts, perturb: bool):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(write_config(tmp_path, train={"base_model": tiny_model, "seq_len": 64, "max_steps": 5,
                                                    "warmup_steps": 1}, eval={"max_sequences": 6, "batch_size": 3}))
    # Ingest chunks: the held-out ones of each kind are the eval sets; train/val chunks must be left out.
    (tmp_path / "out" / "ingest" / "chunks").mkdir(parents=True)
    # Train/val rows sort first by id: a filter that let them through would score them first.
    rows = ([("domain", "train", t) for t in legal_texts[200:210]] + [("general", "val", t) for t in legal_texts[300:305]]
            + [("domain", "heldout", t) for t in legal_texts[:5]] + [("general", "heldout", t) for t in legal_texts[100:103]])
    pq.write_table(pa.table({"id": [f"{i:04d}" for i in range(len(rows))], "kind": [r[0] for r in rows],
                             "split": [r[1] for r in rows], "text": [r[2] for r in rows]}),
                   f"{cfg.output_dir}/ingest/chunks/part-0000.parquet")
    trained = tmp_path / "out" / "train" / "model"
    if perturb:
        m = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            m.model.norm.weight.mul_(1.5)
        m.save_pretrained(trained)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{tiny_model}/{f}", trained / f)
    else:
        shutil.copytree(tiny_model, trained)
    return cfg


def test_same_weights_same_perplexity(ray_local, tmp_path, tiny_model, legal_texts):
    cfg = _setup(tmp_path, tiny_model, legal_texts, perturb=False)
    stats = evaluate.run(cfg)
    res = json.load(open(f"{cfg.output_dir}/eval/eval.json"))
    for s in ("heldout_legal", "general"):
        base, trained = res[s]["base"], res[s]["trained"]
        assert base["tokens"] == trained["tokens"] == base["sequences"] * 63
        assert base["sequences"] == (6 if s == "heldout_legal" else base["sequences"]) and base["sequences"] >= 1
        assert math.isfinite(base["ppl"]) and base["ppl"] > 1
        assert abs(base["ppl"] - trained["ppl"]) < 1e-3 * base["ppl"]
    # Texts are read only until the windows are full (legal: 6 windows of 64 from the first long texts).
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"] >= 2
    assert list(evaluate.heldout_texts(cfg, "domain")) == legal_texts[:5]
    assert list(evaluate.heldout_texts(cfg, "general")) == legal_texts[100:103]


def test_changed_weights_change_perplexity(ray_local, tmp_path, tiny_model, legal_texts):
    cfg = _setup(tmp_path, tiny_model, legal_texts, perturb=True)
    evaluate.run(cfg)
    res = json.load(open(f"{cfg.output_dir}/eval/eval.json"))
    assert abs(res["heldout_legal"]["ppl_change_pct"]) > 0.1
