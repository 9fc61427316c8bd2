"""Scale benchmark: ingest -> convert (regex engine) -> pack on a generated corpus of a given token count;
per stage tokens/s, the driver's peak RSS and Ray's object-store spill.

    .venv/bin/python -m benchmarks.scale --tokens 10e6,50e6,200e6            # many small files, 3 sizes
    .venv/bin/python -m benchmarks.scale --tokens 10e6 --layout small,jsonl,parquet --stages ingest
                                                    # the same corpus as small files, one JSONL, one Parquet file
    .venv/bin/python -m benchmarks.scale --tokens 1e6 --layout jsonl --json out.json   # what CI runs

The first size and layout of an invocation is its baseline: every other run reports its driver peak RSS and
tokens/s per stage as a ratio to it (`vs_first`).

Corpus: unique documents built from real legal sentences, the licence corpus' (licensedcode-data) sentences
recombined with a seed: each document draws 8-60 sentences and starts with a numbered heading, so no two
documents are equal and sizes vary like real filings. General text the same way from the package-docs
sentences, 30% of the domain size (pack mixes 0.1 general tokens per domain token of the converted text, which
is longer than the raw text: the budget is met, and cut, inside the general text). The corpus is the same for a seed and size whatever the layout.

Each stage runs in its own process (`python -m benchmarks.scale stage ...`) that starts its own local Ray, as
`transformllm <stage>` does, and reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the driver alone, not
Ray's workers) and the spilled bytes from Ray's memory summary. tokens/s = the stage's input tokens (ingest:
tokens it produced; convert: tokens of the chunks it converted; pack: tokens it packed) / stage wall time,
Ray start-up included. Record the figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CHARS_PER_TOKEN = 4.0  # SmolLM2's tokenizer on English legal prose: ~4 characters a token (sizes the corpus)
STAGES = ("ingest", "convert", "pack")
SMALL_FILE_BYTES = 256_000


def sentences(builtin: str, limit: int = 200_000) -> list[str]:
    """Sentences (40-400 chars) of a built-in source's texts, deduplicated, in a fixed order."""
    from transformllm_ray.sources.builtin import BUILTINS
    from transformllm_ray.sources.readers import RawDoc, read_file

    seen, out = set(), []
    for wf in BUILTINS[builtin]():
        for rec in read_file(wf):
            if not isinstance(rec, RawDoc):
                continue
            for s in re.split(r"(?<=[.;:])\s+", " ".join(rec.text.split())):
                if 40 <= len(s) <= 400 and s not in seen:
                    seen.add(s)
                    out.append(s)
                    if len(out) >= limit:
                        return out
    return out


def documents(pool: list[str], total_chars: int, seed: int, label: str):
    """Yield unique documents until total_chars: a numbered heading and 8-60 sentences of the pool."""
    rng = random.Random(seed)
    made, i = 0, 0
    while made < total_chars:
        body = " ".join(rng.choice(pool) for _ in range(rng.randint(8, 60)))
        text = f"{label} {i}. {body}"
        made += len(text)
        i += 1
        yield text


def write_corpus(root: str, pool: list[str], tokens: float, seed: int, layout: str, label: str) -> int:
    """Write the corpus under root in the layout; returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    docs = documents(pool, int(tokens * CHARS_PER_TOKEN), seed, label)
    if layout == "parquet":
        batch, writer = [], None
        for d in docs:
            batch.append(d)
            if len(batch) == 512:  # ~1-2 MB row groups
                t = pa.table({"text": batch})
                writer = writer or pq.ParquetWriter(f"{root}/corpus.parquet", t.schema)
                writer.write_table(t)
                batch = []
        if batch:
            t = pa.table({"text": batch})
            writer = writer or pq.ParquetWriter(f"{root}/corpus.parquet", t.schema)
            writer.write_table(t)
        writer.close()
    else:
        n, f, size = 0, None, 0
        for d in docs:
            if f is None or (layout == "small" and size >= SMALL_FILE_BYTES):
                if f:
                    f.close()
                f = open(f"{root}/part-{n:06d}.jsonl" if layout == "small" else f"{root}/corpus.jsonl", "w")
                n, size = n + 1, 0
            line = json.dumps({"text": d}) + "\n"
            f.write(line)
            size += len(line)
        f.close()
    return sum(os.path.getsize(os.path.join(root, x)) for x in os.listdir(root))


def config(out: str, domain: str, general: str, num_cpus: int, shard_bytes: int) -> dict:
    return {
        "output_dir": out, "input": {"paths": [domain]}, "general": {"builtin": None, "paths": [general]},
        "ingest": {"chunk_tokens": 512, "shard_bytes": shard_bytes},
        "split": {"heldout_fraction": 0.01, "val_fraction": 0.01},
        "convert": {"engine": "regex", "max_chunks": None, "rows_per_file": 4096},
        "pack": {"mix_ratio": 0.1, "bucket_tokens": 16_000_000},
        "train": {"seq_len": 2048}, "ray": {"num_cpus": num_cpus},
    }


def spilled_mib() -> float:
    """MiB spilled to disk by this Ray instance's object store (Ray's memory summary)."""
    try:
        from ray._private.internal_api import memory_summary

        m = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
        return float(m.group(1)) if m else 0.0
    except Exception:  # the summary is diagnostics: never fail a benchmark over it
        return -1.0


def run_stage_here(cfg_path: str, stage: str) -> dict:
    """In this process: a local Ray, the stage, then the driver's peak RSS and the spill."""
    import yaml

    from transformllm_ray.config import config_from_dict
    from transformllm_ray.runtime import ray_session
    from transformllm_ray.stage import run_stage

    cfg = config_from_dict(yaml.safe_load(open(cfg_path)))
    t0 = time.time()
    with ray_session(cfg):
        stats = run_stage(cfg, stage)
        spill = spilled_mib()
    return {"stage": stage, "seconds": round(time.time() - t0, 2), "stats": stats, "spilled_mib": spill,
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def stage_tokens(stage: str, stats: dict, prev: dict) -> int:
    if stage == "ingest":
        return int(stats["tokens_out"])
    if stage == "convert":  # tokens of the chunks selected for conversion
        by = prev["ingest"]["stats"]["by_kind_split"]["domain"]
        return sum(v["tokens"] for s, v in by.items() if s != "heldout")
    return int(stats["tokens_in"])


def run_one(work: str, tokens: float, layout: str, args) -> dict:
    """Build the corpus of one size and layout, run the stages each in its own process; the summary."""
    import yaml

    t0 = time.time()
    tag = f"{tokens:.0e}-{layout}".replace("+", "")
    domain, general = f"{work}/corpus/domain-{tag}", f"{work}/corpus/general-{tokens:.0e}".replace("+", "")
    sizes = {"domain_bytes": write_corpus(domain, sentences("licensedcode"), tokens, args.seed, layout, "Section")}
    if not os.path.isdir(general):
        write_corpus(general, sentences("package-docs"), 0.3 * tokens, args.seed + 1, "small", "Note")
    sizes["general_bytes"] = sum(os.path.getsize(os.path.join(general, x)) for x in os.listdir(general))
    print(f"[scale] corpus {tokens:.3g} tokens ({layout}): {sizes} in {time.time() - t0:.1f}s", flush=True)
    out, cfg_path = f"{work}/out-{tag}", f"{work}/config-{tag}.yaml"
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config(out, domain, general, args.num_cpus, args.shard_bytes), f)
    results: dict = {}
    for stage in args.stages.split(","):
        res_path = f"{work}/result-{tag}-{stage}.json"
        cmd = [sys.executable, "-m", "benchmarks.scale", "stage", "--config", cfg_path, "--stage", stage,
               "--result", res_path]
        with open(f"{work}/{tag}-{stage}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
        if rc:
            raise SystemExit(f"[scale] {stage} failed (exit {rc}); log: {work}/{tag}-{stage}.log")
        r = json.load(open(res_path))
        n = stage_tokens(stage, r["stats"], results)
        r["tokens"], r["tokens_per_s"] = n, round(n / r["seconds"], 1)
        results[stage] = r
        st = r["stats"]
        print(f"[scale] {tag} {stage}: {r['seconds']:.1f}s, {n:,} tokens, {r['tokens_per_s']:,.0f} tokens/s, driver "
              f"peak RSS {r['driver_peak_rss_mb']:.0f} MB, spilled {r['spilled_mib']:.0f} MiB; rows in "
              f"{st['rows_in']:,} = out {st['rows_out']:,} + rejected {st['rows_rejected']:,}", flush=True)
    summary = {"tokens_target": tokens, "layout": layout, **sizes,
               "stages": {s: {k: r[k] for k in ("seconds", "tokens", "tokens_per_s", "driver_peak_rss_mb",
                                                "spilled_mib")} for s, r in results.items()}}
    if "ingest" in results:
        i = results["ingest"]["stats"]
        summary["ingest_shards"], summary["ingest_files"] = i["shards"], i["files"]
    if "pack" in results:
        p = results["pack"]["stats"]
        summary["pack"] = {k: p[k] for k in ("mix_ratio_achieved", "mix_by_split", "waste_fraction",
                                             "sequences_train", "buckets")}
    summary["results"] = results
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "stage":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--config", required=True)
        ap.add_argument("--stage", required=True)
        ap.add_argument("--result", required=True)
        a = ap.parse_args()
        json.dump(run_stage_here(a.config, a.stage), open(a.result, "w"))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True,
                    help="domain corpus sizes in tokens, comma-separated (e.g. 10e6,200e6); the first is the baseline")
    ap.add_argument("--layout", default="small",
                    help="layouts, comma-separated: small (many files), jsonl, parquet (one file each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed at the end)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--num-cpus", type=int, default=4, help="Ray logical CPUs (the demo's 4 on 2 cores)")
    ap.add_argument("--shard-bytes", type=int, default=4_000_000, help="ingest.shard_bytes")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each run's stage outputs")
    args = ap.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="bench-scale-")
    runs = [run_one(work, float(t), layout, args) for t in args.tokens.split(",")
            for layout in args.layout.split(",")]
    base = runs[0]
    # Ratios against the first run of this invocation (the baseline measured in the same run).
    for r in runs:
        r["vs_first"] = {s: {"driver_peak_rss": round(v["driver_peak_rss_mb"] / base["stages"][s]["driver_peak_rss_mb"], 3),
                             "tokens_per_s": round(v["tokens_per_s"] / base["stages"][s]["tokens_per_s"], 3)}
                         for s, v in r["stages"].items() if s in base["stages"]}
    env = {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({**env, "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs]}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "runs": runs}, f, indent=2)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
