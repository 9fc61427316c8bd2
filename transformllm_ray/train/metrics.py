"""Training metrics: throughput, MFU against a stated device peak, memory; written on rank 0 only.

    peak, source = device_peak_flops(cfg.train, device)          # FLOP/s of one device, and where it came from
    log = MetricsLogger.open(cfg, train_dir, resume_step, rank)  # no-op on ranks > 0
    log.log(step, {"loss": ..., "lr": ..., ...}); log.close()

MFU = 6 * params * tokens_per_s / (world * peak): 6 FLOPs per parameter per token for forward + backward of
the dense layers, the attention term ignored (at 2,048 tokens it adds ~10% for SmolLM2-135M's width, less for
wider models), the recompute of activation checkpointing not counted (it is overhead, not useful work).
The peak of one device is, in order:
  - `train.peak_tflops` if set;
  - GPUs, dense bf16 spec-sheet peak by device name: H100 and H200 989 TFLOP/s (SXM), A100 312;
  - CPU: measured at start-up, the best of a few 1,024^3 fp32 matmuls on the worker's own threads (an
    achievable peak for that worker's share of the machine, not a spec-sheet figure; ~50-100 GFLOP/s per
    core on current x86). `peak_flops_source` in stats.json says which one was used.

Outputs, both on rank 0: `<output_dir>/train/metrics.jsonl` (one object per logged step: step, loss, lr,
grad_norm, tokens_per_s, mfu, peak_mem_gb, step_time_s, val_loss when evaluated) and W&B. After a restart
from step N the file keeps its rows up to N and continues, so every step appears once. W&B is imported only
when enabled; mode auto = online if WANDB_API_KEY is set, else offline with runs under
`<output_dir>/train/wandb` (`wandb sync` uploads them later). The key is read by wandb from the environment
and never written by us; the config sent to W&B is the run config, which holds no secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Literal, Optional, cast

from transformllm_ray.config import Config, TrainConfig

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 TFLOP/s per device by name fragment (NVIDIA spec sheets, SXM parts, no sparsity)."""

METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "step_time_s")


def measure_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n^3 fp32 matmul on this process's torch threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: first call allocates and picks a kernel
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(tc: TrainConfig, device) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device, how it was obtained); (None, reason) for an unknown GPU."""
    if tc.peak_tflops:
        return tc.peak_tflops * 1e12, f"config train.peak_tflops={tc.peak_tflops}"
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 spec {tflops} TFLOP/s"
        return None, f"{name}: unknown peak; set train.peak_tflops"
    import torch

    flops = measure_cpu_flops()
    return flops, f"cpu: measured fp32 matmul, {torch.get_num_threads()} thread(s), {flops / 1e9:.1f} GFLOP/s"


def peak_memory_gb(device) -> float:
    """GPU: peak allocated by torch. CPU: peak resident set size of this worker process."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def mfu(params: int, tokens_per_s: float, world: int, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    return 6.0 * params * tokens_per_s / (world * peak)


WandbMode = Literal["online", "offline", "disabled"]


def wandb_mode(cfg: Config, environ: Optional[dict] = None) -> WandbMode:
    env = os.environ if environ is None else environ
    mode = cfg.train.wandb.mode
    if mode == "auto":
        # W&B's own switch wins when the user set it (WANDB_MODE=offline with a key in the env: offline).
        user = env.get("WANDB_MODE")
        if user in ("online", "offline", "disabled"):
            return cast(WandbMode, user)
        return "online" if env.get("WANDB_API_KEY") else "offline"
    return mode


def read_metrics(path: str) -> list[dict]:
    from transformllm_ray.storage import exists, read_bytes

    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode().splitlines() if line.strip()]


class MetricsLogger:
    """metrics.jsonl (+ W&B) writer of rank 0; `open` returns a no-op logger on other ranks.

    Local output_dir: appended and flushed per line (a killed run keeps every logged step). Object-store
    output_dir: rewritten atomically by `flush()` (called at each checkpoint and at the end).
    """

    def __init__(self, path: str, rows: list[dict], wandb_run: Any = None):
        from transformllm_ray.storage import is_remote

        self.path, self.rows, self.wandb = path, rows, wandb_run
        self.remote = is_remote(path)
        self._fh = None
        if not self.remote:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:  # keep the rows up to the resume step, drop the rest
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, path)
            self._fh = open(path, "a")

    @classmethod
    def open(cls, cfg: Config, train_dir: str, resume_step: int, rank: int) -> "MetricsLogger":
        if rank != 0:
            return NoOpLogger()
        path = f"{train_dir}/metrics.jsonl"
        rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        run = open_wandb(cfg, train_dir) if cfg.train.wandb.mode != "disabled" else None
        return cls(path, rows, run)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self.rows.append(row)
        if self._fh:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def flush(self) -> None:
        if self.remote:
            from transformllm_ray.storage import write_bytes_atomic

            write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def close(self) -> None:
        self.flush()
        if self._fh:
            self._fh.close()
            self._fh = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NoOpLogger(MetricsLogger):
    def __init__(self):
        self.rows, self.wandb, self._fh, self.remote = [], None, None, False

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass


def wandb_dir(train_dir: str) -> str:
    """Local parent folder of W&B run files: <output_dir>/train (wandb adds `wandb/`); a temp folder when the
    output_dir is on object storage (wandb writes only to local disk)."""
    from transformllm_ray.storage import is_remote

    if is_remote(train_dir):
        import tempfile

        return tempfile.mkdtemp(prefix="transformllm-wandb-")
    os.makedirs(train_dir, exist_ok=True)
    return train_dir


def open_wandb(cfg: Config, train_dir: str):
    """A W&B run (lazy import), resumed across restarts: its id is derived from output_dir and run name."""
    import wandb

    mode = wandb_mode(cfg)
    os.environ["WANDB_MODE"] = mode  # workers: the env var wins over defaults in some wandb versions
    run_id = hashlib.sha256(f"{cfg.output_dir}|{cfg.train.run_name}".encode()).hexdigest()[:16]
    return wandb.init(
        project=cfg.train.wandb.project, entity=cfg.train.wandb.entity, name=cfg.train.run_name, id=run_id,
        resume="allow", mode=mode, dir=wandb_dir(train_dir), config=cfg.model_dump(mode="json"),
        settings=wandb.Settings(console="off", silent=True),
    )
