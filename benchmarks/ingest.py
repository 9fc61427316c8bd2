"""Ingest throughput: the Ray Data stage vs a plain single-process Python loop doing the same work.

    .venv/bin/python -m benchmarks.ingest [--max-files N] [--repeats 1]

Corpus: the embedded default, licensedcode-data (~2,300 files, ~15M characters). Both paths run the same
functions (read, parse, normalise, filter, hash, in-shard dedup, chunk with the SmolLM2 tokenizer, write work
files, cross-shard dedup, final Parquet); the baseline calls them in one loop in this process, the stage
fans shards out to Ray Data actors. Both include tokenizer loading; Ray start-up (once per cluster) is not
counted. The tokenizer's own Rust thread pool is off in both (TOKENIZERS_PARALLELISM=false), so the baseline
is a true single-process loop. Prints characters/s of each and the ratio; record it in benchmarks/RESULTS.md.
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


def make_cfg(out: str, max_files: int | None):
    from transformllm_ray.config import config_from_dict

    return config_from_dict({"output_dir": out, "input": {"builtin": "licensedcode", "max_files": max_files},
                             "ray": {"num_cpus": os.cpu_count()}})


def plain_loop(cfg) -> dict:
    """The same work, sequentially, in this process."""
    from transformllm_ray.ingest import stage as ingest
    from transformllm_ray.ingest.chunking import Chunker
    from transformllm_ray.models.assets import load_fast_tokenizer
    from transformllm_ray.storage import makedirs

    t0 = time.time()
    chunker = Chunker(load_fast_tokenizer(cfg.ingest_tokenizer), cfg.ingest.chunk_tokens)
    out = cfg.stage_dir("ingest")
    for d in ("_markers", "chunks", "rejects", "minhash"):
        makedirs(f"{out}/{d}")
    shards = ingest.plan_shards(ingest.list_work_files(cfg), cfg.ingest.shard_bytes)
    counts = [ingest.process_shard(s["unit_id"], s["files"], cfg, chunker) for s in shards]
    final = ingest.finalize(cfg, [s["unit_id"] for s in shards], sum(int(c["docs_out"]) for c in counts))
    return {"seconds": time.time() - t0, "rows_in": sum(c["rows_in"] for c in counts), "chunks": final["chunks_out"]}


def ray_stage(cfg) -> dict:
    from transformllm_ray.ingest import stage as ingest

    t0 = time.time()
    stats = ingest.run(cfg)
    return {"seconds": time.time() - t0, "rows_in": stats["rows_in"], "chunks": stats["chunks_out"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import ray

    from transformllm_ray.ingest.stage import list_work_files
    from transformllm_ray.models.assets import resolve_model

    resolve_model("builtin:smollm2-135m-instruct")  # build the cached model folder outside the timings
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    cfg = make_cfg(f"{tmp}/x", args.max_files)
    chars = sum(f.size for f in list_work_files(cfg))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    results = {"plain": [], "ray": []}
    try:
        for r in range(args.repeats):
            for name, fn in (("plain", plain_loop), ("ray", ray_stage)):
                run_cfg = make_cfg(f"{tmp}/{name}-{r}", args.max_files)
                res = fn(run_cfg)
                results[name].append(res)
                print(f"{name:5s} run {r}: {res['seconds']:.2f}s  {chars / res['seconds'] / 1e6:.2f} M bytes/s  "
                      f"rows_in={res['rows_in']} chunks={res['chunks']}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(r["seconds"] for r in v) for k, v in results.items()}
    assert results["plain"][0]["chunks"] == results["ray"][0]["chunks"], "both paths must produce the same chunks"
    summary = {
        "input_bytes": chars, "files": results["ray"][0]["rows_in"], "chunks": results["ray"][0]["chunks"],
        "plain_seconds": round(best["plain"], 2), "ray_seconds": round(best["ray"], 2),
        "plain_MBps": round(chars / best["plain"] / 1e6, 3), "ray_MBps": round(chars / best["ray"] / 1e6, 3),
        "speedup_ray_over_plain": round(best["plain"] / best["ray"], 2),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
