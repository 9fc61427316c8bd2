"""Test helper: a real pack-stage output for the train stage, built from real licence text.

    cfg = train_config(tmp_path, tiny_model, max_steps=6)
    write_packed(cfg, legal_texts)     # <output_dir>/pack/packed/{train,val}/part-*.parquet + pack stats.json

Same contract as the pack stage: documents tokenised with the model's tokenizer, joined with EOS, cut into
exactly seq_len-token windows (`input_ids` list<int32>, `sequence` int64), the tail shorter than a window
dropped; every `val_every`-th document goes to val. stats.json is written through `write_stats`, so the
train stage sees a finished pack stage with the right fingerprint.
"""

from __future__ import annotations

from typing import Any


def train_config(tmp_path, model: str, **train: Any):
    """A Config for train tests: the tiny model, 2 gloo workers x 1 CPU (ray_local has 4), short sequences,
    W&B off unless asked for."""
    from transformllm_ray.config import config_from_dict

    base = {"base_model": model, "run_name": "test", "num_workers": 2, "cpus_per_worker": 1.0, "seq_len": 64,
            "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 6, "warmup_steps": 1, "lr": 3e-3,
            "checkpoint_every": 3, "eval_every": 3, "eval_batches": 2, "max_failures": 0,
            "wandb": {"mode": "disabled"}}
    base.update(train)
    return config_from_dict({"output_dir": str(tmp_path / "out"), "input": {"builtin": "licensedcode"},
                             "pack": {"tokenizer": model}, "train": base})


def write_packed(cfg, texts: list[str], val_every: int = 10, parts: int = 2) -> dict:
    """Write the packed splits and the pack stage's stats.json; returns {split: rows}."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoTokenizer

    from transformllm_ray.models.assets import resolve_model
    from transformllm_ray.pack.windows import cut, join_with_eos, windows_column
    from transformllm_ray.stage import write_stats
    from transformllm_ray.storage import write_parquet_atomic

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.pack_tokenizer))
    seq_len = cfg.train.seq_len
    lists: dict[str, list[list[int]]] = {"train": [], "val": []}
    for i, text in enumerate(texts):
        split = "val" if i % val_every == 0 else "train"
        lists[split].append(tok(text, add_special_tokens=False)["input_ids"])
    rows = {}
    for split, token_lists in lists.items():
        windows = cut(join_with_eos(token_lists, tok.eos_token_id)[0], seq_len)  # the pack stage's packer
        n = len(windows)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        for p in range(parts):
            lo, hi = bounds[p], bounds[p + 1]
            table = pa.table({"input_ids": windows_column(windows[lo:hi]),
                              "sequence": pa.array(np.arange(lo, hi), type=pa.int64())})
            write_parquet_atomic(table, f"{cfg.stage_dir('pack')}/packed/{split}/part-{p:05d}.parquet")
        rows[split] = n
    write_stats(cfg, "pack", {"rows_in": len(texts), "rows_out": len(texts), "rows_rejected": 0, "seconds": 0.0,
                              "tokenizer": cfg.pack_tokenizer, "seq_len": seq_len,
                              "eos_token_id": tok.eos_token_id, "vocab_size": len(tok),
                              "sequences": rows})
    return rows
