"""vLLM dtype on this machine: bare vLLM generation in each dtype, same prompts, one run, the ratio.

    .venv/bin/python -m benchmarks.vllm_dtype                        # SmolLM2-135M: float32 vs bfloat16
    .venv/bin/python -m benchmarks.vllm_dtype --prompts 64 --prompt-tokens 200 --dtypes float32,bfloat16

Why: `convert.vllm.dtype: auto` picks float32 on CPUs without bf16 instructions (vllm_engine.engine_dtype).
Each dtype runs in its own process, one after the other (never both at once): `vllm.LLM` loads the model,
then one `generate` over every prompt (random token ids, a fixed seed: the same prompts for each dtype),
greedy, `ignore_eos`, `--max-tokens` new tokens each. Figures per dtype: load seconds, generate seconds,
prompt + output tokens/s of generate; the ratio is each dtype's generate time against the first one's.
On CPU the engine binds threads as the environment says (VLLM_CPU_OMP_THREADS_BIND; unset: vLLM's default).
Prints one JSON summary; record it in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

from benchmarks.convert import run_bare

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ONE_DTYPE = r"""
import json, random, sys, time

def main():
    spec = json.load(open(sys.argv[1]))
    t0 = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(spec["model"], dtype=spec["dtype"], enforce_eager=True, max_model_len=spec["max_model_len"])
    t1 = time.time()
    rnd = random.Random(0)
    prompts = [{"prompt_token_ids": [rnd.randrange(100, spec["vocab"]) for _ in range(spec["prompt_tokens"])]}
               for _ in range(spec["prompts"])]
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out = llm.generate(prompts, sp, use_tqdm=False)
    t2 = time.time()
    n = sum(len(o.outputs[0].token_ids) for o in out)
    print("RESULT", json.dumps({"load_seconds": t1 - t0, "generate_seconds": t2 - t1, "output_tokens": n}))

if __name__ == "__main__":  # vLLM starts its engine core with spawn
    main()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the first is the baseline")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    from transformllm_ray.convert.vllm_engine import cpu_has_bf16, engine_dtype
    from transformllm_ray.models.assets import load_tokenizer, resolve_model

    model = resolve_model(args.model)
    spec = {"model": model, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "max_model_len": args.prompt_tokens + args.max_tokens + 16,
            "vocab": len(load_tokenizer(model))}
    runs: dict[str, dict] = {}
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
            res = run_bare(ONE_DTYPE, {**spec, "dtype": dtype}, tmp, dtype, {})
        tokens = args.prompts * args.prompt_tokens + res["output_tokens"]
        runs[dtype] = {"process_seconds": round(res["process_seconds"], 1),
                       "load_seconds": round(res["load_seconds"], 1),
                       "generate_seconds": round(res["generate_seconds"], 1), "output_tokens": res["output_tokens"],
                       "tokens_per_s": round(tokens / res["generate_seconds"], 1)}
    base = next(iter(runs.values()))["generate_seconds"]
    for r in runs.values():
        r["generate_time_vs_first"] = round(r["generate_seconds"] / base, 2)
    print(json.dumps({"model": args.model, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                      "max_tokens": args.max_tokens, "runs": runs, "cpu_has_bf16": cpu_has_bf16(),
                      "auto_dtype_on_cpu": engine_dtype("auto", "cpu"), "cpus": os.cpu_count(),
                      "machine": platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
