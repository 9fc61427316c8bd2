"""`transformllm plan`: estimate tokens, GPU-hours and wall time of conversion and training before running.

    transformllm plan --config configs/mistral-legal-7b.yaml

Every estimate prints the assumption behind it and where the number comes from:
- corpus tokens: ingest's stats.json if ingest has run, else input bytes / 4.2 characters per token (English
  legal text under Llama/Mistral-style tokenizers, measured ~4.1-4.3 on the licence corpus);
- conversion throughput: output tokens/s per GPU from benchmarks/RESULTS.md's machine-readable block when a
  GPU figure was measured there, else vLLM's published ~6,000 output tokens/s for an 8B model on one H100
  (method notes), scaled by 8B / converter size;
- training throughput: tokens/s per GPU = MFU x peak / (6 x params) with MFU from RESULTS.md if measured on a
  GPU, else 0.40 (torchtitan FSDP on H100: 33-39%; LLM Foundry 46%), peak 989 TFLOP/s (H100 bf16 dense).
"""

from __future__ import annotations

import json
import os
import re

from transformllm_ray.config import Config
from transformllm_ray.convert.config import cost_of
from transformllm_ray.resources import describe

CHARS_PER_TOKEN = 4.2
H100_BF16_PEAK = 989e12
PUBLISHED_VLLM_8B_H100 = 6000.0  # output tokens/s, 8B model, one H100, offline (method notes)
DEFAULT_MFU = 0.40
# Parameter counts of models a preset may name without local weights (no hub access needed to plan).
KNOWN_PARAMS = {
    "microsoft/phi-2": 2.78e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "builtin:smollm2-135m-instruct": 1.345e8,
}
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "RESULTS.md")


def measured_figures(path: str = RESULTS) -> dict:
    """The ```json plan-inputs``` block of benchmarks/RESULTS.md ({} if absent)."""
    if not os.path.isfile(path):
        return {}
    m = re.search(r"```json plan-inputs\n(.*?)```", open(path).read(), re.S)
    return json.loads(m.group(1)) if m else {}


def model_params(name: str) -> tuple[float, str]:
    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name], "table of known models"
    path = os.path.expanduser(name)
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        c = json.load(open(cfg_file))
        h, n, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size", 4 * h)
        kv = c.get("num_key_value_heads", c.get("num_attention_heads", 1)) / c.get("num_attention_heads", 1)
        per_layer = 2 * h * h + 2 * h * h * kv + 3 * h * inter
        return n * per_layer + v * h * (1 if c.get("tie_word_embeddings") else 2), f"{cfg_file} (estimate)"
    return 7e9, "unknown model: assumed 7B"


def corpus_tokens(cfg: Config) -> tuple[float, str]:
    from transformllm_ray.stage import stats_uri
    from transformllm_ray.storage import exists, read_json

    if exists(stats_uri(cfg, "ingest")):
        st = read_json(stats_uri(cfg, "ingest"))
        return float(st.get("domain_tokens", st["tokens_out"])), "ingest/stats.json (measured domain tokens)"
    if cfg.input.expected_tokens:
        return float(cfg.input.expected_tokens), "input.expected_tokens (config)"
    from transformllm_ray.ingest.stage import list_work_files

    try:
        size = sum(f.size for f in list_work_files(cfg) if f.kind == "domain")
    except (FileNotFoundError, OSError) as e:
        return 0.0, f"input not reachable from here ({str(e)[:120]}); set input.expected_tokens"
    return size / CHARS_PER_TOKEN, f"{size:,} input bytes / {CHARS_PER_TOKEN} chars per token (compressed inputs: more)"


PROMPT_OVERHEAD_TOKENS = 100
"""Instruction and chat template around the passage in one task's prompt (legal/v1 with SmolLM2's template:
~60-100 tokens)."""


def estimate(cfg: Config) -> dict:
    figs = measured_figures()
    tokens, tok_src = corpus_tokens(cfg)
    convert_tokens = tokens * (1 - cfg.split.heldout_fraction)
    chunks = convert_tokens / max(cfg.ingest.chunk_tokens * 0.8, 1)  # chunks fill ~80% of the bound on average
    if cfg.convert.max_chunks is not None:
        chunks = min(chunks, cfg.convert.max_chunks)
    out_per_task = figs.get("convert_output_tokens_per_task", cfg.convert.sampling.max_tokens * 0.6)
    out_tokens = chunks * cfg.convert.tasks_per_chunk * out_per_task
    conv_params, conv_src = model_params(cfg.convert.model)
    gpu_tps = figs.get("convert_output_tokens_per_s_per_gpu")
    if gpu_tps:
        tps_src = "benchmarks/RESULTS.md (measured on GPU)"
    else:
        gpu_tps = PUBLISHED_VLLM_8B_H100 * min(8e9 / conv_params, 8.0)
        tps_src = "vLLM published ~6k output tok/s for 8B on one H100, scaled by 8B/params (capped 8x)"
    conv_gpus = cfg.convert.vllm.num_engines * cfg.convert.vllm.tensor_parallel_size
    conv_gpu_h = out_tokens / gpu_tps / 3600 * cfg.convert.vllm.tensor_parallel_size
    # Prompt tokens: the chunk plus the instruction and chat template (~100 tokens), once per task.
    in_tokens = chunks * cfg.convert.tasks_per_chunk * (cfg.ingest.chunk_tokens * 0.8 + PROMPT_OVERHEAD_TOKENS)
    cost = cost_of(cfg.convert, in_tokens, out_tokens, conv_gpu_h / max(conv_gpus, 1) * 3600)

    params, p_src = model_params(cfg.train.base_model)
    t = cfg.train
    tokens_per_step = t.num_workers * t.micro_batch_size * t.grad_accum_steps * t.seq_len
    train_tokens = tokens_per_step * t.max_steps
    mfu = figs.get("train_mfu_gpu", DEFAULT_MFU)
    peak = (t.peak_tflops * 1e12) if t.peak_tflops else H100_BF16_PEAK
    train_tps = mfu * peak / (6 * params)
    train_gpu_h = train_tokens / train_tps / 3600
    return {
        "corpus_tokens": tokens, "corpus_tokens_source": tok_src,
        "chunks_to_convert": chunks, "convert_output_tokens": out_tokens,
        "convert_output_tokens_per_task": out_per_task, "converter_params": conv_params,
        "converter_params_source": conv_src, "convert_tokens_per_s_per_gpu": gpu_tps,
        "convert_tokens_per_s_source": tps_src, "convert_gpus": conv_gpus, "convert_gpu_hours": conv_gpu_h,
        "convert_wall_hours": conv_gpu_h / max(conv_gpus, 1), "convert_input_tokens": in_tokens,
        "convert_cost": cost,
        "train_tokens": train_tokens, "tokens_per_step": tokens_per_step, "train_params": params,
        "train_params_source": p_src, "train_mfu": mfu,
        "train_mfu_source": "benchmarks/RESULTS.md" if "train_mfu_gpu" in figs else "assumed 0.40 (published FSDP range)",
        "peak_flops": peak, "train_tokens_per_s_per_gpu": train_tps, "train_gpus": t.num_workers,
        "train_gpu_hours": train_gpu_h, "train_wall_hours": train_gpu_h / max(t.num_workers, 1),
        "asks": describe(cfg, gpus=1),
    }


def print_plan(cfg: Config) -> dict:
    e = estimate(cfg)
    print(f"Plan for {cfg.output_dir}")
    print(f"  corpus: {e['corpus_tokens']:,.0f} tokens  [{e['corpus_tokens_source']}]")
    print(f"  convert: {e['chunks_to_convert']:,.0f} chunks x {cfg.convert.tasks_per_chunk} tasks x "
          f"{e['convert_output_tokens_per_task']:.0f} output tokens = {e['convert_output_tokens']:,.0f} output tokens")
    print(f"    converter {cfg.convert.model}: {e['converter_params'] / 1e9:.2f}B params  [{e['converter_params_source']}]")
    print(f"    {e['convert_tokens_per_s_per_gpu']:,.0f} output tokens/s per GPU  [{e['convert_tokens_per_s_source']}]")
    if cfg.convert.engine == "vllm":
        print(f"    {e['convert_gpu_hours']:,.1f} GPU-hours; {e['convert_gpus']} GPUs -> {e['convert_wall_hours']:,.2f} h wall")
    p = cfg.convert.cost
    budget = f"; convert.max_cost {cfg.convert.max_cost:,.2f}" if cfg.convert.max_cost else ""
    print(f"    expected cost {e['convert_cost']:,.2f} {p.currency}: {e['convert_input_tokens']:,.0f} input tokens x "
          f"{p.input_per_million:g} + {e['convert_output_tokens']:,.0f} output tokens x {p.output_per_million:g} per "
          f"million" + (f" + GPU-hours x {p.gpu_hour:g}" if cfg.convert.engine == "vllm" else "") + budget)
    print(f"  train: {cfg.train.max_steps:,} steps x {e['tokens_per_step']:,} tokens = {e['train_tokens']:,.0f} tokens")
    print(f"    {cfg.train.base_model}: {e['train_params'] / 1e9:.2f}B params  [{e['train_params_source']}]")
    print(f"    MFU {e['train_mfu']:.2f} [{e['train_mfu_source']}] x peak {e['peak_flops'] / 1e12:.0f} TFLOP/s "
          f"-> {e['train_tokens_per_s_per_gpu']:,.0f} tokens/s per GPU")
    print(f"    {e['train_gpu_hours']:,.1f} GPU-hours; {e['train_gpus']} GPUs -> {e['train_wall_hours']:,.2f} h wall")
    print("  Ray resource asks, placed at once per stage, on a cluster with GPUs (resources.py):")
    for line in e["asks"]:
        print(f"    {line}")
    return e
