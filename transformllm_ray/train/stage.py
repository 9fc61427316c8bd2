"""Train stage: continued pre-training of `train.base_model` on the packed sequences, FSDP2 on Ray Train.

    transformllm train --config configs/debug-local.yaml [train.max_steps=40 ...]

Input: `<output_dir>/pack/packed/{train,val}/part-*.parquet` (column `input_ids`: exactly train.seq_len token
ids per row) and the pack stage's stats.json (its completion marker: tokenizer, seq_len, vocab_size).
Output, under `<output_dir>/train/`:
    model/          HF folder (safetensors, config, tokenizer): loads in transformers and vLLM
    metrics.jsonl   one JSON object per logged step (rank 0)
    wandb/          offline W&B runs (unless W&B is online or disabled)
    summary.json    final facts from rank 0; then stats.json (the completion marker)
    checkpoints/    `<run_name>/step-*` sharded checkpoints, unless train.storage_path points elsewhere

The driver checks the input against the config (sequence length, vocabulary), plans the data (rows per
worker, steps per epoch), then runs one `TorchTrainer` (loop.py on every worker) with the packed splits as
Ray Data datasets. Resume: Ray Train V2 keys runs by RunConfig(name=train.run_name, storage_path); a rerun
with the same name finds the run's latest checkpoint (`train.resume=auto`). `train.resume=never` refuses to
start when the run already has checkpoints (pick a new run name: nothing is silently overwritten);
`train.resume=<checkpoint folder/URI>` starts from that checkpoint. `FailureConfig(max_failures)` restarts
a failed worker group from the latest checkpoint within one call.

CPU settings: Ray Train reserves `num_workers x cpus_per_worker` CPUs and Ray Data needs at least one more
to read Parquet; when the workers hold every CPU, the read task never starts and training hangs. On a
2-CPU machine use `train.cpus_per_worker: 0.5` (torch still runs one thread per worker: loop.py), or
`ray.num_cpus: 4`. The stage refuses a configuration that leaves Ray Data no CPU, instead of hanging.

stats.json rows: rows_in = packed train sequences; rows_out = distinct sequences the run trained on;
rows_rejected = the rest, never trained on: the remainder of the equal split across workers, the tail of an
epoch that does not fill an optimizer step, and everything past max_steps when the run is shorter than an
epoch (`unused_reasons` breaks it down). `sequences_trained` counts repeats over epochs.
"""

from __future__ import annotations

import logging
import os
import time

from transformllm_ray.config import Config, join_uri
from transformllm_ray.console import polling, say
from transformllm_ray.resources import check_train_room, cluster_gpus, train_gpu, train_pool
from transformllm_ray.stage import stage_fingerprint, upstream_stats, write_stats
from transformllm_ray.storage import is_remote, list_files, read_json

log = logging.getLogger("transformllm")
STAGE = "train"


def inputs(cfg: Config) -> dict:
    """What the trained model and its metrics depend on (stage.py): the initial weights, the optimisation
    (the global batch includes num_workers), precision, evaluation cadence, the seed. Not where checkpoints
    go or how often, resume, failures, CPUs, the run name or W&B: they change no weight."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import section

    return {**section(cfg.train, "train", exclude=[
        "base_model", "resume", "run_name", "storage_path", "cpus_per_worker", "checkpoint_every",
        "keep_checkpoints", "max_failures", "wandb"]),
        "train.base_model": model_key(cfg.train.base_model), "seed": cfg.seed}


def storage_path(cfg: Config) -> str:
    """Checkpoint root: train.storage_path, else <output_dir>/train/checkpoints (absolute, as Ray needs)."""
    path = cfg.train.storage_path or join_uri(cfg.stage_dir(STAGE), "checkpoints")
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def packed_files(cfg: Config, split: str) -> list[str]:
    return list_files(f"{cfg.stage_dir('pack')}/packed/{split}", ".parquet")


def count_rows(uris: list[str]) -> int:
    import pyarrow.parquet as pq

    from transformllm_ray.storage import filesystem

    n = 0
    for u in uris:
        fs, path = filesystem(u)
        with fs.open_input_file(path) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


def check_input(cfg: Config, pack_stats: dict, model_vocab: int) -> None:
    """Clear errors for a packed input that does not fit this training config or model."""
    seq_len = pack_stats.get("seq_len")
    if seq_len is not None and seq_len != cfg.train.seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} but the pack stage packed {seq_len}-token "
                         f"sequences ({cfg.stage_dir('pack')}); set both to the same value")
    vocab = pack_stats.get("vocab_size")
    if vocab is not None and vocab > model_vocab:
        raise ValueError(f"the pack tokenizer {pack_stats.get('tokenizer')!r} has {vocab} tokens but "
                         f"{cfg.train.base_model} embeds {model_vocab}: pack with the model's tokenizer")


def worker_env(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """(plain env vars, secret env vars) for the training workers, from `ray.forward_env`.

    Plain ones (WANDB_MODE, HF_HUB_OFFLINE, ...) go through the workers' runtime env. Secrets (runtime.is_secret:
    WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) do not: Ray 2.60's runtime-env agent
    logs every runtime env it creates, values included, at INFO in `<session>/logs/runtime_env_agent.log`.
    They travel through the object store instead (`ray.put` here, `ray.get` in each worker, in memory
    only) and are set in the worker's own environment, where wandb and huggingface_hub read them.
    """
    from transformllm_ray.runtime import forwarded_env, split_secrets
    from transformllm_ray.train.metrics import wandb_mode

    plain, secrets = split_secrets(forwarded_env(cfg.ray.forward_env))
    plain["TOKENIZERS_PARALLELISM"] = "false"
    if cfg.train.wandb.mode != "disabled":
        plain["WANDB_MODE"] = wandb_mode(cfg)
    return plain, secrets


def build_trainer(cfg: Config, plan, val_batches: int, train_files: list[str], val_files: list[str]):
    import ray
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from transformllm_ray.train.loop import train_loop_per_worker

    tc = cfg.train
    gpu = train_gpu(cfg, cluster_gpus())
    check_train_room(cfg, gpu)
    # Only the train split streams through Ray Data; the few val rows are read by each worker (data.py).
    datasets = {"train": ray.data.read_parquet(train_files, columns=["input_ids"])}
    pool = train_pool(cfg, gpu)
    resources = pool.unit if pool else {"CPU": tc.cpus_per_worker}
    plain_env, secrets = worker_env(cfg)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "train_dir": cfg.stage_dir(STAGE),
        "val_files": val_files, "val_batches": val_batches,
        "plan": {"rows": plan.rows, "world": plan.world, "micro_batch": plan.micro_batch, "accum": plan.accum,
                 "seq_len": plan.seq_len},
        "tokenizer": cfg.pack_tokenizer, "fingerprint": stage_fingerprint(cfg, STAGE),
        "secrets": ray.put(secrets) if secrets else None,  # an ObjectRef: the values never enter a log
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=tc.run_name, storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            worker_runtime_env={"env_vars": plain_env},
        ),
        datasets=datasets,
        # preserve_order: the same rows reach the same worker in the same order every run (data.py), which
        # makes the data position a step number and resume bit-exact.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False),
    )


def summarize(cfg: Config, plan, summary: dict, rows: list[dict], seconds: float) -> dict:
    """stats.json content from the workers' summary and metrics.jsonl."""
    from transformllm_ray.train.metrics import mfu

    steps = summary["steps"]
    # Throughput over the steps after the first (the first pays one-off allocation and thread start-up).
    timed = [r for r in rows if r["step"] > 1 and "step_time_s" in r] or rows
    secs = sum(r["step_time_s"] for r in timed)
    tps = plan.tokens_per_step * len(timed) / secs if secs else None
    trained = plan.distinct_rows_trained(steps)
    unused = {"split_remainder": plan.rows - plan.rows_per_worker * plan.world,
              "epoch_tail": (plan.rows_per_worker - plan.steps_per_epoch * plan.micro_batch * plan.accum)
              * plan.world}
    unused["past_max_steps"] = plan.rows - trained - sum(unused.values())
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {
        "rows_in": plan.rows, "rows_out": trained, "rows_rejected": plan.rows - trained,
        "unused_reasons": unused, "seconds": round(seconds, 3), "steps": steps,
        "final_loss": summary["final_loss"], "first_loss": rows[0]["loss"] if rows else None,
        "final_val_loss": val[-1] if val else None, "tokens_seen": summary["tokens_seen"],
        "sequences_trained": steps * plan.sequences_per_step, "epochs": round(steps / plan.steps_per_epoch, 3),
        "tokens_per_s": round(tps, 1) if tps else None,
        "mfu": mfu(summary["params"], tps, plan.world, summary["peak_flops_used"]) if tps else None,
        "peak_flops_used": summary["peak_flops_used"], "peak_flops_source": summary["peak_flops_source"],
        "peak_mem_gb": max((r.get("peak_mem_gb", 0) for r in rows), default=None),
        "model_dir": summary["model_dir"], "params": summary["params"], "workers": plan.world,
        "device": summary["device"], "compute_dtype": summary["compute_dtype"], "seq_len": plan.seq_len,
        "tokens_per_step": plan.tokens_per_step, "run_name": cfg.train.run_name,
        "checkpoints": storage_path(cfg) + "/" + cfg.train.run_name, "state_from": summary["state_from"],
    }


def run(cfg: Config) -> dict:
    from transformllm_ray.train.checkpoint import list_checkpoints
    from transformllm_ray.train.data import DataPlan
    from transformllm_ray.train.metrics import read_metrics
    from transformllm_ray.train.model import base_model_folder, read_model_config

    t0 = time.time()
    tc = cfg.train
    pack_stats = upstream_stats(cfg, "pack")
    train_files, val_files = packed_files(cfg, "train"), packed_files(cfg, "val")
    if not train_files:
        raise FileNotFoundError(f"train: no packed sequences under {cfg.stage_dir('pack')}/packed/train")
    folder = base_model_folder(tc.base_model)  # builds builtin:* once here, not in every worker
    model_cfg = read_model_config(folder)
    check_input(cfg, pack_stats, int(model_cfg.get("vocab_size", 0)))
    if tc.seq_len > int(model_cfg.get("max_position_embeddings", tc.seq_len)):
        raise ValueError(f"train.seq_len={tc.seq_len} exceeds {tc.base_model}'s max_position_embeddings="
                         f"{model_cfg['max_position_embeddings']}")
    n_val = count_rows(val_files) if val_files else 0
    plan = DataPlan(rows=count_rows(train_files), world=max(1, tc.num_workers), micro_batch=tc.micro_batch_size,
                    accum=tc.grad_accum_steps, seq_len=tc.seq_len)
    plan.check()
    # Validation micro-batches per worker: eval_batches, fewer if the val split is small; 0 = no val_loss.
    val_batches = min(tc.eval_batches, n_val // (plan.world * plan.micro_batch)) if tc.eval_every else 0

    existing = list_checkpoints(storage_path(cfg), tc.run_name)
    if existing and tc.resume == "never":
        raise RuntimeError(f"train.resume=never but run {tc.run_name!r} already has checkpoints "
                           f"({existing[-1][1]}); choose another train.run_name or delete them")
    if existing and tc.resume == "auto":
        say(f"[train] resuming run {tc.run_name!r} from step {existing[-1][0]} ({existing[-1][1]})")
    say(f"[train] {plan.rows} train / {n_val} val sequences of {plan.seq_len} tokens; {plan.world} workers, "
        f"{plan.tokens_per_step} tokens/step, {plan.steps_per_epoch} steps/epoch, {tc.max_steps} steps")

    trainer = build_trainer(cfg, plan, val_batches, train_files, val_files)
    metrics_uri = f"{cfg.stage_dir(STAGE)}/metrics.jsonl"

    def latest() -> dict | None:  # the live line's source: rank 0's metrics file, polled while on a terminal
        rows = read_metrics(metrics_uri)
        return {"done": rows[-1]["step"], "loss": rows[-1]["loss"]} if rows else None

    with polling(STAGE, tc.max_steps, "steps", latest):
        trainer.fit()  # raises ray.train.TrainingFailedError once max_failures restarts are spent

    train_dir = cfg.stage_dir(STAGE)
    summary = read_json(f"{train_dir}/summary.json")
    rows = read_metrics(f"{train_dir}/metrics.jsonl")
    stats = summarize(cfg, plan, summary, rows, time.time() - t0)
    if stats["mfu"] is not None:
        stats["mfu"] = round(stats["mfu"], 5)
    return write_stats(cfg, STAGE, stats)

