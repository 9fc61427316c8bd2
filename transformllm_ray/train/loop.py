"""The per-worker training loop that Ray Train runs on every worker (`train_loop_per_worker`).

Started by stage.py through `TorchTrainer`; not run by hand. Per worker:

 1. Set-up: torch threads = ceil(train.cpus_per_worker) (Ray reserves CPUs but does not pin threads; two
    workers each running torch's default of one thread per core would oversubscribe a 2-core machine 2x).
    Ray Train has already created the process group (gloo on CPU, nccl on GPU); a 1-D device mesh over it.
 2. Model: built on meta, parallelize() (activation checkpointing, fully_shard per block, root), to_empty.
 3. State: the latest checkpoint of this run if Ray has one (a FailureConfig restart or a rerun with the same
    run name), else the checkpoint named by `train.resume`, else the base weights (`train.base_model`).
    Crash resume and initial weights are separate settings: a checkpoint always wins over base_model.
 4. Steps: for each optimizer step, `grad_accum_steps` micro-batches from this worker's Ray Data shard
    (data.py), forward with labels (transformers shifts them; mean token cross-entropy), backward scaled by
    1/accum, gradient clipping (total norm over all shards), AdamW, LR schedule. Gradients are
    reduce-scattered every micro-batch (`train.fsdp_reshard=always`) or once per step (`per_step`), see
    parallelize.py.
 5. Every `log_every` steps rank 0 logs loss (mean over ranks), lr, grad_norm, tokens_per_s (all ranks),
    mfu, peak_mem_gb (rank 0's), step_time_s (data wait + compute, not eval or checkpoint); val_loss every
    `eval_every` steps. Every `checkpoint_every` steps and at the end: a sharded checkpoint (checkpoint.py).
 6. End: the full weights are gathered to rank 0 (CPU) and saved as an HF folder at <output_dir>/train/model;
    rank 0 writes <output_dir>/train/summary.json, which the driver turns into stats.json.

Each rank also writes <output_dir>/train/workers/rank-<r>.json (pid, host, attempt start, resumed step):
which processes ran the current attempt, for operators (and for the test that kills one).
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

from transformllm_ray.config import Config, config_from_dict


def _worker_setup(cfg: Config):
    import ray.train
    import torch
    import torch.distributed as dist

    tc = cfg.train
    torch.set_num_threads(max(1, math.ceil(tc.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if torch.cuda.is_available() and tc.use_gpu != "no":
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    distributed = dist.is_available() and dist.is_initialized()
    mesh = None
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    return rank, world, device, mesh, distributed


def _all_mean(x, distributed: bool, world: int) -> float:
    """Mean of a scalar tensor over ranks (SUM then divide: gloo has no AVG)."""
    import torch.distributed as dist

    if distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return float(x.item())


def _receive_secrets(ref) -> list[str]:
    """Set the secret env vars the driver put in the object store (stage.worker_env); returns their names."""
    if ref is None:
        return []
    import ray

    secrets = ray.get(ref)
    os.environ.update(secrets)
    return sorted(secrets)


def _write_worker_info(train_dir: str, rank: int, world: int, start_step: int, source: str, model,
                       secret_names: list[str]) -> None:
    from transformllm_ray.storage import write_json_atomic

    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    write_json_atomic(f"{train_dir}/workers/rank-{rank}.json", {
        "rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(),
        "started_at": time.time(), "start_step": start_step, "state_from": source,
        "local_param_elements": local, "secrets_received": secret_names})


def evaluate(model, batches: list, device, distributed: bool, world: int) -> float:
    import torch

    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            total += model(input_ids=ids, labels=ids).loss.detach().float()
    model.train(was_training)
    return _all_mean(total / max(1, len(batches)), distributed, world)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from transformllm_ray.train import checkpoint as ckpt
    from transformllm_ray.train.data import DataPlan, read_val_batches
    from transformllm_ray.train.metrics import MetricsLogger, device_peak_flops, mfu, peak_memory_gb
    from transformllm_ray.train.model import (
        base_model_folder, build_meta_model, count_params, export_hf_from_shards, load_base_weights, materialize,
    )
    from transformllm_ray.train.optim import build_optimizer, build_scheduler
    from transformllm_ray.train.parallelize import compute_dtype, parallelize, reshard_mode, set_micro_batch

    cfg = config_from_dict(loop_config["cfg"])
    tc = cfg.train
    train_dir = loop_config["train_dir"]
    plan = DataPlan(**loop_config["plan"])
    rank, world, device, mesh, distributed = _worker_setup(cfg)
    secret_names = _receive_secrets(loop_config.get("secrets"))  # names only: values are never written
    if world != plan.world:
        raise RuntimeError(f"planned for {plan.world} workers, running with {world}")

    # ---- model, optimizer, schedule
    folder = base_model_folder(tc.base_model)
    model = build_meta_model(folder)
    parallelize(model, mesh, tc, device.type)
    materialize(model, device)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    params = count_params(model)
    reshard = reshard_mode(tc, device.type)

    # ---- state: this run's latest checkpoint > train.resume > base weights
    checkpoint = ray.train.get_checkpoint() or ckpt.checkpoint_from(tc.resume)
    step, tokens_seen = 0, 0
    if checkpoint is not None:
        state = ckpt.load_checkpoint(checkpoint, model, opt)
        for key in ("world", "rows_per_worker", "micro_batch", "accum", "seq_len"):
            have, want = state["plan"][key], getattr(plan, key)
            if have != want:
                raise RuntimeError(f"checkpoint {ckpt.checkpoint_uri(checkpoint)} was written with {key}={have}, "
                                   f"this run has {want}: its data position does not apply; use another "
                                   "train.run_name")
        ckpt.restore_scheduler(sched, opt, state)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        source = f"checkpoint {ckpt.checkpoint_uri(checkpoint)} (step {step})"
    else:
        load_base_weights(model, folder)
        source = f"base model {tc.base_model}"
    _write_worker_info(train_dir, rank, world, step, source, model, secret_names)
    if rank == 0:
        print(f"[train] rank 0/{world} on {device}: {params / 1e6:.1f}M params, "
              f"{compute_dtype(tc, device.type)}, reshard {reshard}, state from {source}", flush=True)

    # ---- data
    shard = ray.train.get_dataset_shard("train")
    val_batches = read_val_batches(loop_config["val_files"], rank, loop_config["val_batches"], tc.micro_batch_size,
                                   tc.seq_len) if loop_config["val_batches"] else []

    peak, peak_source = device_peak_flops(tc, device)
    logger = MetricsLogger.open(cfg, train_dir, step, rank)

    def trainer_state(at: int) -> dict:
        epoch, done = plan.position(at)
        return {"step": at, "tokens_seen": tokens_seen, "scheduler": sched.state_dict(),
                "plan": {"world": world, "rows_per_worker": plan.rows_per_worker, "micro_batch": plan.micro_batch,
                         "accum": plan.accum, "seq_len": plan.seq_len},
                "data_position": {"epoch": epoch, "micro_batches_done_in_epoch": done},
                "base_model": tc.base_model, "run_name": tc.run_name}

    last_loss = None
    model.train()
    t_prev = time.perf_counter()
    for step, group in plan.steps(shard, step, tc.max_steps):  # noqa: B020 - resumes from the restored step
        lr = sched.get_last_lr()[0]
        loss_sum = torch.zeros((), device=device)
        for i, ids in enumerate(group):
            ids = ids.to(device, non_blocking=True)
            set_micro_batch(model, i == len(group) - 1, reshard)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / len(group)).backward()
            loss_sum += loss.detach().float()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        tokens_seen += plan.tokens_per_step
        last_loss = _all_mean(loss_sum / len(group), distributed, world)  # also syncs the device
        step_time = time.perf_counter() - t_prev

        val_loss = None
        if val_batches and (step % tc.eval_every == 0 or step == tc.max_steps):
            val_loss = evaluate(model, val_batches, device, distributed, world)
        if step % tc.log_every == 0 or step == tc.max_steps or val_loss is not None:
            tps = plan.tokens_per_step / step_time
            logger.log(step, {"loss": last_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps,
                              "mfu": mfu(params, tps, world, peak), "peak_mem_gb": peak_memory_gb(device),
                              "step_time_s": step_time, "val_loss": val_loss, "epoch": plan.position(step - 1)[0]})
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            logger.flush()
            ckpt.save_checkpoint(step, model, opt, trainer_state(step),
                                 {"step": step, "loss": last_loss, "tokens_seen": tokens_seen}, rank)
        t_prev = time.perf_counter()

    # ---- export and summary
    dest = f"{train_dir}/model"
    export_hf_from_shards(model, folder, dest, tokenizer=loop_config["tokenizer"], rank=rank, provenance={
        "base_model": tc.base_model, "run_name": tc.run_name, "steps": step, "tokens_seen": tokens_seen,
        "seq_len": tc.seq_len, "fingerprint": loop_config["fingerprint"]})
    if rank == 0:
        from transformllm_ray.storage import write_json_atomic

        write_json_atomic(f"{train_dir}/summary.json", {
            "steps": step, "tokens_seen": tokens_seen, "final_loss": last_loss if last_loss is not None
            else (logger.rows[-1]["loss"] if logger.rows else None), "params": params,
            "peak_flops_used": peak, "peak_flops_source": peak_source, "world": world, "device": str(device),
            "compute_dtype": compute_dtype(tc, device.type), "model_dir": dest, "state_from": source})
    logger.close()
