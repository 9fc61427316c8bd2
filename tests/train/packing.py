"""Test helper: the train stage's input, made by the real pack stage from real licence text.

    cfg = train_config(tmp_path, tiny_model, max_steps=6)
    write_packed(cfg, legal_texts)     # runs pack: <output_dir>/pack/packed/{train,val}/ + its stats.json

The texts are written as a Parquet file of domain text (`text`, `split`: every `val_every`-th document val)
that `pack.domain_paths` names, with no general text mixed in (`pack.mix_ratio=0`): pack then reads nothing
else, and the test's sequences are exactly what the pipeline would train on. Needs a running Ray.
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
    return config_from_dict({
        "output_dir": str(tmp_path / "out"), "input": {"builtin": "licensedcode"},
        "pack": {"tokenizer": model, "domain_paths": [str(tmp_path / "domain-text.parquet")], "mix_ratio": 0.0,
                 "num_actors": 1},
        "train": base})


def write_packed(cfg, texts: list[str], val_every: int = 10) -> dict:
    """Write `texts` where cfg.pack.domain_paths points and run the pack stage; returns {split: sequences}."""
    import pyarrow as pa

    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import write_parquet_atomic

    splits = ["val" if i % val_every == 0 else "train" for i in range(len(texts))]
    write_parquet_atomic(pa.table({"text": texts, "split": splits}), cfg.pack.domain_paths[0])
    stats = run_stage(cfg, "pack")
    return {"train": stats["sequences_train"], "val": stats["sequences_val"]}
