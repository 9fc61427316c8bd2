"""Eval stage: perplexity of the base and the trained model on held-out legal text and on general text.

    transformllm eval --config configs/debug-local.yaml

Sets: the held-out chunks of `ingest/chunks/` (split `heldout`, assigned by ingest: never converted, never
packed): kind `domain` is `heldout_legal`, kind `general` is `general` (the forgetting check). Each set is
tokenised with the training tokenizer, joined with EOS and cut into `train.seq_len` windows like training
data; the first `eval.max_sequences` windows are scored. The ingest parts are read one at a time, in name
order (rows in id order within a part), only until the windows are full: memory and time are bounded by
`eval.max_sequences`, not by the corpus. Both models see exactly the same tokens, so their
perplexities compare. Each (model, set) pair is a Ray task (a GPU task on GPU clusters), run in parallel.

Optional: `eval.lm_eval_tasks` runs lm-evaluation-harness tasks on both models (needs `pip install lm-eval`
and the tasks' data available locally; with HF_HUB_OFFLINE=1 nothing is downloaded).

Writes `eval/eval.json` ({set: {model: {ppl, nll, tokens, sequences}}}, deltas) and stats.json.
"""

from __future__ import annotations

import math
import time

from transformllm_ray.config import Config
from transformllm_ray.console import progress
from transformllm_ray.resources import cluster_gpus, eval_pool, train_gpu
from transformllm_ray.stage import write_stats
from transformllm_ray.storage import list_files, local_folder, read_parquet, write_json_atomic

STAGE = "eval"


def inputs(cfg: Config) -> dict:
    """What eval's numbers depend on (stage.py): the sets' size, the window (seq_len), the tokenizer, the
    base model it scores before training, the lm-eval tasks; not its batch size."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import section

    # decontaminate_*: pack's (what training text may contain), not what eval scores.
    return {**section(cfg.eval, "eval", exclude=["batch_size", "decontaminate_paths", "decontaminate_text_field"]),
            "train.seq_len": cfg.train.seq_len,
            "pack.tokenizer": model_key(cfg.pack_tokenizer), "train.base_model": model_key(cfg.train.base_model)}
SETS = {"heldout_legal": "domain", "general": "general"}
"""Eval set -> the `kind` of its held-out ingest chunks."""


def heldout_texts(cfg: Config, kind: str):
    """The held-out chunk texts of one kind, part by part (a generator: the caller stops when it has enough)."""
    import pyarrow.compute as pc

    for uri in sorted(list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet")):
        t = read_parquet(uri, columns=["id", "kind", "split", "text"])
        t = t.filter(pc.and_(pc.equal(t["kind"], kind), pc.equal(t["split"], "heldout"))).sort_by("id")
        yield from t["text"].to_pylist()


def eval_windows(cfg: Config, kind: str) -> tuple[list[list[int]], int, int]:
    """(windows of seq_len token ids, texts read, texts used) for one eval set: held-out texts in id order,
    tokenised until they fill `eval.max_sequences` windows, packed as pack packs (pack/windows.py)."""
    from transformllm_ray.models.assets import load_tokenizer
    from transformllm_ray.pack.windows import cut, join_with_eos

    tok = load_tokenizer(cfg.pack_tokenizer)
    seq, limit = cfg.train.seq_len, cfg.eval.max_sequences
    lists: list[list[int]] = []
    n_read = have = 0
    for text in heldout_texts(cfg, kind):
        if have >= limit * seq:
            break
        n_read += 1
        if text.strip():
            lists.append(tok(text, add_special_tokens=False)["input_ids"])
            have += len(lists[-1]) + 1
    buf, _ = join_with_eos(lists, tok.eos_token_id)
    windows = cut(buf, seq)[:limit].tolist()
    if not windows and len(buf):
        windows = [buf.tolist()]  # a set shorter than one window is still scored
    return windows, n_read, len(lists)


def score(model_path: str, windows: list[list[int]], batch_size: int) -> dict:
    """Mean next-token NLL over all predicted tokens; runs where Ray schedules it (GPU if given one)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with local_folder(model_path) as path:  # the trained model may be on s3:// gs://
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[i:i + batch_size], device=device)
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                    ids[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
    nll = total / max(count, 1)
    return {"nll": round(nll, 5), "ppl": round(math.exp(nll), 4), "tokens": count, "sequences": len(windows)}


def run_lm_eval(model_path: str, tasks: list[str]) -> dict:
    try:
        import lm_eval
    except ImportError:
        raise ImportError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval") from None
    with local_folder(model_path) as path:
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=tasks)
    return res.get("results", {})


def run(cfg: Config) -> dict:
    import ray

    from transformllm_ray.models.assets import resolve_model

    t0 = time.time()
    trained = f"{cfg.stage_dir('train')}/model"
    models = {"base": resolve_model(cfg.train.base_model), "trained": trained}
    # Same device rule as training (train.use_gpu): "yes" asks for GPUs even when none is up yet, so an
    # autoscaling cluster scaled to zero brings one up instead of scoring a 7B model on CPUs.
    pool = eval_pool(train_gpu(cfg, cluster_gpus()))
    remote_score = ray.remote(num_cpus=pool.cpus, num_gpus=pool.gpus)(score)

    windows, rows_in, rows_used = {}, 0, 0
    for name, kind in SETS.items():
        w, n_in, n_used = eval_windows(cfg, kind)
        windows[name] = w
        rows_in, rows_used = rows_in + n_in, rows_used + n_used
    futures = {(s, m): remote_score.remote(path, windows[s], cfg.eval.batch_size)
               for s in SETS for m, path in models.items() if windows[s]}
    results: dict = {s: {} for s in SETS}
    with progress(STAGE, len(futures), "scores") as bar:
        for (s, m), f in futures.items():
            results[s][m] = ray.get(f)
            bar.update(1)
    for r in results.values():
        if "base" in r and "trained" in r:
            r["ppl_change_pct"] = round(100 * (r["trained"]["ppl"] / r["base"]["ppl"] - 1), 2)
    if cfg.eval.lm_eval_tasks:
        results["lm_eval"] = {m: run_lm_eval(p, cfg.eval.lm_eval_tasks) for m, p in models.items()}
    results["models"] = models
    write_json_atomic(f"{cfg.stage_dir(STAGE)}/eval.json", results)
    summary = {f"{s}_{m}_ppl": results[s][m]["ppl"] for s in SETS for m in models if m in results[s]}
    return write_stats(cfg, STAGE, {
        "rows_in": rows_in, "rows_out": rows_used, "rows_rejected": rows_in - rows_used,
        "reject_reasons": {"beyond_max_sequences_or_empty": rows_in - rows_used} if rows_in > rows_used else {},
        **summary, "seconds": round(time.time() - t0, 3),
    })
