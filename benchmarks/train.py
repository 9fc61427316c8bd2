"""Train throughput: our Ray Train FSDP2 loop vs a plain single-process torch loop, same model and data.

    .venv/bin/python -m benchmarks.train [--model builtin:smollm2-135m-instruct] [--seq-len 256] [--steps 10]
    python -m benchmarks.train --shape mistral-1b         # GPU: random 1.1B Mistral-shaped model, bf16, seq 2048

CPU (the default): SmolLM2-135M, fp32, same packed data (licence texts packed by the pack stage with the model's
tokenizer: EOS-joined, cut into seq_len windows), same optimizer and schedule (transformllm_ray.train.optim), same global
batch: workers x micro-batch x accumulation sequences per optimizer step (default 2 x 4 x 1 x 256 tokens).
The baseline is one process with torch on every core, one forward/backward per micro-batch of all workers'
sequences, no Ray, no FSDP; ours is the train stage itself (Ray Train, 2 workers x 0.5 CPU on a 2-CPU Ray, one
torch thread and half the batch each, FSDP2 over gloo with the CPU default train.fsdp_reshard=per_step, Ray
Data feeding).

GPU (`--shape mistral-1b`, or any model with a CUDA device present): one worker on one GPU by default
(`--workers`), bf16 compute with fp32 master weights (FSDP2's MixedPrecisionPolicy in ours, torch.autocast
in the baseline), seq 2048, micro-batch 4; the random weights are written once as a bf16 safetensors folder
(benchmarks/shapes.py). MFU = 6 x params x tokens/s over the GPU's dense bf16 peak (train/metrics.py).

Both report tokens/s over the steps after the first (the first pays one-off allocations); Ray's start-up and
teardown are reported separately as wall-clock seconds. Prints one JSON object with the ratio ours / baseline
(target >= 0.85); record it in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def make_cfg(out: str, model: str, seq_len: int, steps: int, micro_batch: int, workers: int, cuda: bool,
             extra: dict | None = None):
    from transformllm_ray.config import config_from_dict

    # CPU: the cores less one (Ray Data's file listing needs a whole CPU) shared by the workers, at least 0.5
    # each; the loop runs ceil(cpus_per_worker) torch threads, so 2 workers on 2 cores get one thread each.
    cpus = 4.0 if cuda else max(0.5, ((os.cpu_count() or 1) - 1) / workers)
    train = {"base_model": model, "run_name": "bench", "num_workers": workers, "cpus_per_worker": cpus,
             "use_gpu": "yes" if cuda else "no",
             "seq_len": seq_len, "micro_batch_size": micro_batch, "grad_accum_steps": 1, "max_steps": steps,
             "warmup_steps": 1, "lr": 1e-5, "checkpoint_every": 10_000, "eval_every": 0, "wandb": {"mode": "disabled"},
             **(extra or {})}
    return config_from_dict({"output_dir": out, "input": {"builtin": "licensedcode"},
                             "pack": {"tokenizer": model, "mix_ratio": 0.0,
                                      "domain_paths": [os.path.join(os.path.dirname(out), "domain-text.parquet")]},
                             "train": train, "ray": {"num_cpus": os.cpu_count()}})


def write_packed(cfg, n_seqs: int) -> int:
    """Licence texts (cycled for long runs) holding at least n_seqs windows, packed by the pack stage itself
    (pack.domain_paths, no general text mixed in); returns the train sequences it made. Needs a running Ray."""
    import itertools

    import pyarrow as pa

    from transformllm_ray.models.assets import load_tokenizer
    from transformllm_ray.sources.builtin import licensedcode_files
    from transformllm_ray.sources.readers import RawDoc, read_file
    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import write_parquet_atomic

    tok = load_tokenizer(cfg.pack_tokenizer)
    need = (n_seqs + 2) * cfg.train.seq_len  # + a window of slack: pack drops each bucket's partial last one
    texts, have = [], 0
    for wf in itertools.cycle(licensedcode_files()):
        for rec in read_file(wf):
            if isinstance(rec, RawDoc) and len(rec.text) > 500:
                texts.append(rec.text)
                have += len(tok(rec.text, add_special_tokens=False)["input_ids"]) + 1
        if have >= need:
            break
    write_parquet_atomic(pa.table({"text": texts, "split": ["train"] * len(texts)}), cfg.pack.domain_paths[0])
    return int(run_stage(cfg, "pack")["sequences_train"])


def plain_loop(cfg, cuda: bool) -> dict:
    """The baseline: one process, all cores (or one GPU), the same model, optimizer, schedule and sequences."""
    import contextlib

    import torch

    from transformllm_ray.storage import read_parquet
    from transformllm_ray.train.metrics import device_peak_flops, mfu
    from transformllm_ray.train.stage import packed_files
    from transformllm_ray.train.model import (
        base_model_folder, build_meta_model, count_params, load_base_weights, materialize,
    )
    from transformllm_ray.train.optim import build_optimizer, build_scheduler

    tc = cfg.train
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count())
    torch.manual_seed(cfg.seed)
    folder = base_model_folder(tc.base_model)
    model = build_meta_model(folder)
    materialize(model, device)
    load_base_weights(model, folder)
    params = count_params(model)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    rows = read_parquet(packed_files(cfg, "train"))["input_ids"].to_pylist()  # the files the stage reads
    micro = tc.num_workers * tc.micro_batch_size  # one forward = every worker's micro-batch together
    batch = micro * tc.grad_accum_steps
    # GPU: bf16 compute, fp32 parameters and optimizer (what FSDP2's MixedPrecisionPolicy does in ours).
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    if cuda:
        # Autocast leaves the embedding's output fp32, so the residual stream, norms and RoPE would run in fp32
        # where ours (bf16 parameters) runs them in bf16: a slower baseline. Start the stream in bf16 too.
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.to(torch.bfloat16))
    times, losses = [], []
    model.train()
    for step in range(tc.max_steps):
        t = time.perf_counter()
        total = torch.zeros((), device=device)
        for i in range(tc.grad_accum_steps):
            lo = step * batch + i * micro
            ids = torch.tensor(rows[lo:lo + micro], dtype=torch.long, device=device)
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            (loss / tc.grad_accum_steps).backward()
            total += loss.detach().float() / tc.grad_accum_steps  # no sync per micro-batch, as in ours
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(total.item())  # waits for the GPU: the step is done
        times.append(time.perf_counter() - t)
    tokens = batch * tc.seq_len
    steady = times[1:]
    tps = tokens * len(steady) / sum(steady)
    peak, _ = device_peak_flops(tc, device)
    out = {"tokens_per_s": tps, "first_step_s": times[0], "losses": losses, "mfu": mfu(params, tps, 1, peak),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    # The Ray worker is another process: give it the GPU. `loss`'s graph holds every parameter, so it goes too.
    del model, opt, sched, loss, ids
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return out


def ray_stage(cfg) -> dict:
    from transformllm_ray.train.stage import run

    t = time.time()
    stats = run(cfg)
    with open(f"{cfg.stage_dir('train')}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {"tokens_per_s": stats["tokens_per_s"], "wall_s": time.time() - t, "mfu": stats["mfu"],
            "peak_flops_source": stats["peak_flops_source"], "peak_mem_gb_rank0": stats["peak_mem_gb"],
            "step_times": [round(r["step_time_s"], 3) for r in rows], "losses": [r["loss"] for r in rows],
            "steps_time_s": sum(r["step_time_s"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    # mistral-7b is not offered: fp32 weights, gradients and AdamW states alone (16 B x 7.2B = 116 GB) exceed a
    # GPU, and the baseline loop cannot shard them.
    ap.add_argument("--shape", choices=["mistral-1b"], default=None,
                    help="random weights of this shape instead of --model (benchmarks/shapes.py); GPU only")
    ap.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 2048 on GPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="default 10 on CPU (~10 s a step), 30 on GPU (~0.2 s a step: 10 would time ~2 s)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per worker per micro-batch")
    ap.add_argument("--workers", type=int, default=None, help="Ray Train workers: default 2 on CPU, 1 on GPU")
    ap.add_argument("--train", default="{}", help="JSON of extra train.* settings for both runs "
                    "(e.g. '{\"grad_accum_steps\": 2}')")
    args = ap.parse_args()

    import ray
    import torch

    from benchmarks import shapes
    from transformllm_ray.models.assets import resolve_model

    cuda = torch.cuda.is_available()
    workers = args.workers or (1 if cuda else 2)
    if args.shape and not cuda:
        ap.error(f"--shape {args.shape} is a GPU benchmark and torch sees no CUDA device (torch {torch.__version__})")
    if cuda and workers > torch.cuda.device_count():
        ap.error(f"--workers {workers}: this machine has {torch.cuda.device_count()} GPU(s); Ray would wait forever")
    args.steps = args.steps or (30 if cuda else 10)
    seq_len = args.seq_len or (2048 if cuda else 256)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    try:
        # Model folders are built outside the timings.
        model = shapes.weights_folder(f"{tmp}/model", args.shape) if args.shape else args.model
        resolve_model(model)
        extra = json.loads(args.train)
        cfg = make_cfg(f"{tmp}/out", model, seq_len, args.steps, args.micro_batch, workers, cuda, extra)
        per_step = workers * args.micro_batch * cfg.train.grad_accum_steps
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=env)
        try:
            n = write_packed(cfg, per_step * (args.steps + 1))
        finally:
            ray.shutdown()  # the baseline runs with no Ray on the machine
        plain = plain_loop(cfg, cuda)
        print(f"plain: {plain['tokens_per_s']:.1f} tokens/s", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=env)
        try:
            ours = ray_stage(cfg)
        finally:
            ray.shutdown()
        print(f"ray:   {ours['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "model": args.shape or args.model, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "workers": workers, "seq_len": seq_len, "steps": args.steps, "sequences": n, "micro_batch": args.micro_batch,
        "grad_accum_steps": cfg.train.grad_accum_steps, "tokens_per_step": per_step * seq_len,
        "train_overrides": extra,
        "plain_tokens_per_s": round(plain["tokens_per_s"], 1),
        "ray_fsdp2_tokens_per_s": round(ours["tokens_per_s"], 1),
        "ratio_ray_over_plain": round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
        "ray_wall_s_incl_startup": round(ours["wall_s"], 1), "ray_steps_s": round(ours["steps_time_s"], 1),
        "ray_mfu": ours["mfu"], "plain_mfu": plain["mfu"], "ray_peak_flops_source": ours["peak_flops_source"],
        "ray_peak_mem_gb_rank0": round(ours["peak_mem_gb_rank0"], 2), "plain_peak_mem_gb": plain["peak_mem_gb"],
        "ray_step_times_s": ours["step_times"],
        "plain_first_losses": [round(x, 4) for x in plain["losses"][:3]],
        "ray_first_losses": [round(x, 4) for x in ours["losses"][:3]],
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
