"""Convert stage: ingest's chunks -> reading-comprehension training text (`converted/`) and `rejects/`.

    transformllm convert --config configs/debug-local.yaml
    transformllm convert --config configs/debug-local.yaml convert.engine=regex convert.max_chunks=100

Selection (driver). The chunk ids of `ingest/chunks/` (ids and doc ids only are read), minus held-out
documents (`splits.is_heldout`: the eval set, never converted), sorted, the first `convert.max_chunks`.
rows_in = that selection; held-out and beyond-max chunks are reported as stats, not as rejects.

Resume (driver). `Ledger.recover()` drops files of an unfinished commit; ids already committed are skipped;
ids whose first attempt is committed in pending/ go straight to the retry pass. Finished work is not redone.

Conversion (Ray Data, streaming). engine vllm: chunk rows -> task rows -> PromptBuilder -> ray.data.llm vLLM
engines -> QualityGate (vllm_engine.py). engine regex: chunk rows -> RegexConverter (regex_engine.py). The
driver iterates the output; a chunk is finished when all its task rows are in; every `convert.rows_per_file`
finished chunks are committed atomically (ledger.py). With `convert.retry_rejected`, chunks with an answer
that failed the quality gate are committed to pending/ and, after the first pass, their failed tasks run
once more with `convert.retry_sampling` (a second engine start-up, paid once per run, not per chunk).

Accounting. Counts are read back from the committed files, not from memory; every selected chunk id must be
in exactly one converted/ or rejects/ row, else the stage fails before writing stats.json (its completion
marker): rows_in = rows_out + rows_rejected, exactly.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Iterable

from transformllm_ray.config import Config
from transformllm_ray.convert.format import training_text
from transformllm_ray.convert.ledger import Ledger
from transformllm_ray.convert.prompts import PromptDB, load_prompts, sample_families
from transformllm_ray.schema import make_reject
from transformllm_ray.splits import is_heldout
from transformllm_ray.stage import stage_fingerprint, write_stats
from transformllm_ray.storage import exists, list_files, read_parquet

log = logging.getLogger("transformllm")
STAGE = "convert"
EXCERPT = 200
CHUNK_COLUMNS = ["id", "doc_id", "text", "position", "metadata"]


# ------------------------------------------------------------------------------------------- selection
def select_chunks(cfg: Config) -> tuple[list[str], list[str], dict[str, int]]:
    """(chunk files, selected chunk ids in sorted order, counts of held-out / beyond-max / available)."""
    files = list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet")
    if not files:
        raise FileNotFoundError(f"no chunks under {cfg.stage_dir('ingest')}/chunks: run `transformllm ingest` first")
    t = read_parquet(files, columns=["id", "doc_id"])
    ids, docs = t["id"].to_pylist(), t["doc_id"].to_pylist()
    if len(ids) != len(set(ids)):
        raise ValueError("ingest/chunks holds a chunk id twice: ingest output is corrupt; rerun ingest")
    keep = sorted(i for i, d in zip(ids, docs) if not is_heldout(d, cfg.split))
    heldout = len(ids) - len(keep)
    selected = keep if cfg.convert.max_chunks is None else keep[: cfg.convert.max_chunks]
    return files, selected, {"chunks_available": len(ids), "heldout_chunks": heldout,
                             "beyond_max_chunks": len(keep) - len(selected)}


def keep_ids(batch, todo: list[str]):
    """Ray Data filter (pyarrow batch): the rows whose `id` is in `todo`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch["id"], value_set=pa.array(todo, pa.string())))


# ------------------------------------------------------------------------------------------- assembly
def task_result(row: dict[str, Any]) -> dict[str, Any]:
    """A gated task row, or an engine-error row (which bypassed the gate), as one plain task result."""
    err = row.get("__inference_error__") or ""
    base = {"task_index": int(row["task_index"]), "family": str(row["family"]), "words": str(row.get("words") or ""),
            "attempt": int(row["attempt"]), "sampling": json.loads(str(row["sampling"])),
            "prompt_truncated": bool(row.get("prompt_truncated", False))}
    if err:
        return {**base, "output": "", "status": "engine_error", "detail": str(err)[:500], "finish_reason": "error",
                "input_tokens": 0, "output_tokens": 0}
    return {**base, "output": str(row["output"]), "status": str(row["status"]), "detail": str(row["detail"]),
            "finish_reason": str(row["finish_reason"]), "input_tokens": int(row["input_tokens"]),
            "output_tokens": int(row["output_tokens"])}


class ChunkAssembler:
    """Collects the task rows of each chunk (in any order, duplicates from retried engine batches ignored)
    and, once a chunk has all of them, classifies it: converted, reject, or pending (retry later)."""

    def __init__(self, cfg: Config, db: PromptDB, model_revision: str):
        self.cfg, self.db = cfg, db
        self.base = {"engine": "vllm", "model": cfg.convert.model, "model_revision": model_revision,
                     "prompt_version": db.version_tag}
        self.open: dict[str, dict[int, dict]] = {}
        self.meta: dict[str, dict] = {}
        self.done: set[tuple[str, int]] = set()
        self.tokens = collections.Counter()

    def add(self, row: dict[str, Any]) -> tuple[str, dict] | None:
        cid, attempt = str(row["chunk_id"]), int(row["attempt"])
        if (cid, attempt) in self.done:
            return None
        t = task_result(row)
        tasks = self.open.setdefault(cid, {})
        if t["task_index"] in tasks:
            return None
        tasks[t["task_index"]] = t
        self.tokens["input"] += t["input_tokens"]
        self.tokens["output"] += t["output_tokens"]
        self.tokens["truncated"] += t["prompt_truncated"]
        self.tokens["engine_errors"] += t["status"] == "engine_error"
        self.meta.setdefault(cid, {"doc_id": str(row["doc_id"]), "text": str(row["chunk_text"]),
                                   "prev": str(row.get("prev") or ""), "n": int(row["n_tasks"])})
        if len(tasks) < self.meta[cid]["n"]:
            return None
        self.done.add((cid, attempt))
        meta = self.meta.pop(cid)
        new = [tasks[i] for i in sorted(self.open.pop(cid))]
        spent = {"input_tokens": sum(t["input_tokens"] for t in new),
                 "output_tokens": sum(t["output_tokens"] for t in new)}
        return (*self.classify(cid, meta, new, attempt), spent)

    def incomplete(self) -> int:
        return len(self.open)

    def classify(self, cid: str, meta: dict, new: list[dict], attempt: int) -> tuple[str, dict]:
        spent = list(new)
        if attempt == 1:
            final = new
        else:
            first = json.loads(meta["prev"])
            by_index = {t["task_index"]: t for t in new}
            final = [by_index.get(t["task_index"], t) for t in first]
            spent += first
        bad = [t for t in final if t["status"] != "ok"]
        if not bad:
            q = [(self.db.question(t["family"], t["words"]), t["output"]) for t in final]
            return "converted", {
                "id": cid, "doc_id": meta["doc_id"], "text": training_text(meta["text"], q, self.db),
                "raw_output": json.dumps([t["output"] for t in final], ensure_ascii=False),
                "task_families": ",".join(t["family"] for t in final), **self.base,
                "sampling": json.dumps([t["sampling"] for t in final], sort_keys=True),
                "input_tokens": sum(t["input_tokens"] for t in spent),
                "output_tokens": sum(t["output_tokens"] for t in spent),
                "finish_reason": ",".join(t["finish_reason"] for t in final), "status": "ok",
                "attempts": max(t["attempt"] for t in final), "seconds": 0.0}
        retryable = attempt == 1 and self.cfg.convert.retry_rejected and all(t["status"] != "engine_error" for t in bad)
        if retryable:
            return "pending", {"id": cid, "doc_id": meta["doc_id"], "text": meta["text"],
                               "tasks": json.dumps(final, ensure_ascii=False)}
        t = bad[0]
        retried = " after a retry with convert.retry_sampling" if attempt == 2 else ""
        detail = f"task {t['task_index']} ({t['family']}): {t['detail']}{retried}; " + ", ".join(
            f"{x['family']}={x['status']}" for x in final)
        return "reject", make_reject(STAGE, cid, t["status"], detail, t["output"], EXCERPT).__dict__


# ------------------------------------------------------------------------------------------- committing
class Committer:
    """Buffers finished chunks and commits them `rows_per_file` at a time through the ledger."""

    def __init__(self, ledger: Ledger, rows_per_file: int, attempt: int):
        self.ledger, self.n, self.attempt = ledger, rows_per_file, attempt
        self.buf: dict[str, list[dict]] = {"converted": [], "reject": [], "pending": []}
        self.tokens = collections.Counter()
        self.t_last: float | None = None  # set at the pass's first output: start-up is not per-row time
        self.commits = 0
        self.counts = collections.Counter()

    def start(self) -> None:
        if self.t_last is None:
            self.t_last = time.time()

    def add(self, kind: str, row: dict, spent: dict | None = None) -> None:
        """One finished chunk; `spent` = engine tokens it used in this pass (recorded in the commit marker)."""
        self.start()
        self.buf[kind].append(row)
        self.tokens.update(spent or {})
        self.counts[kind] += 1
        if sum(len(v) for v in self.buf.values()) >= self.n:
            self.flush()

    def flush(self) -> None:
        rows = sum(len(v) for v in self.buf.values())
        if not rows:
            return
        now = time.time()
        # Amortised wall time per chunk: time since the previous commit (the first: since the pass's first
        # output), shared by this commit's rows. Their sum over a pass is the pass's time after start-up.
        per_row = (now - self.t_last) / rows
        for r in self.buf["converted"]:
            r["seconds"] = round(per_row, 4)
        self.ledger.commit(self.buf["converted"], self.buf["reject"], self.buf["pending"],
                           {"attempt": self.attempt, "seconds": round(now - self.t_last, 3),
                            "input_tokens": self.tokens["input_tokens"], "output_tokens": self.tokens["output_tokens"]})
        self.commits += 1
        print(f"[convert] pass {self.attempt}: committed {rows} chunks (ok {len(self.buf['converted'])}, "
              f"rejected {len(self.buf['reject'])}, to retry {len(self.buf['pending'])})", flush=True)
        self.t_last = now
        self.buf = {"converted": [], "reject": [], "pending": []}
        self.tokens = collections.Counter()


def consume(rows: Iterable[dict], assembler: ChunkAssembler, committer: Committer) -> dict[str, float]:
    """Drive a pass: feed output rows to the assembler, commit finished chunks. Returns timing figures."""
    t0 = time.time()
    first = None
    for row in rows:
        if first is None:
            first = time.time()
            committer.start()
        done = assembler.add(row)
        if done is not None:
            committer.add(*done)
    committer.flush()
    if assembler.incomplete():
        raise RuntimeError(f"convert: {assembler.incomplete()} chunks lack task results after the engine pass "
                           "(rows lost by the engine pipeline); rerun to redo them")
    end = time.time()
    return {"seconds": end - t0, "seconds_to_first_output": (first or end) - t0}


# ------------------------------------------------------------------------------------------- passes
def vllm_pass(cfg: Config, source_files: list[str], todo: list[str], attempt: int, ledger: Ledger,
              db: PromptDB, model_path: str, device: str, revision: str) -> dict[str, Any]:
    import ray

    from transformllm_ray.convert.vllm_engine import engine_pipeline, expand_tasks, sampling_dict

    c = cfg.convert
    sampling = sampling_dict(c.sampling if attempt == 1 else c.retry_sampling)
    cols = ["id", "doc_id", "text"] + (["tasks"] if attempt == 2 else [])
    ds = ray.data.read_parquet(source_files, columns=cols)
    ds = ds.map_batches(expand_tasks, fn_kwargs={
        "todo": todo, "domain": c.domain, "version": c.prompt_version, "tasks_per_chunk": c.tasks_per_chunk,
        "seed": cfg.seed, "sampling": sampling, "attempt": attempt}, batch_format="numpy", num_cpus=0.1)
    out = engine_pipeline(ds, cfg, c.model, model_path, device)
    assembler = ChunkAssembler(cfg, db, revision)
    committer = Committer(ledger, c.rows_per_file, attempt)
    timing = consume(out.iter_rows(), assembler, committer)
    return {**timing, "input_tokens": assembler.tokens["input"], "output_tokens": assembler.tokens["output"],
            "prompts_truncated": assembler.tokens["truncated"], "engine_errors": assembler.tokens["engine_errors"],
            "commits": committer.commits, **{f"chunks_{k}": v for k, v in committer.counts.items()}}


def regex_pass(cfg: Config, files: list[str], todo: list[str], ledger: Ledger, db: PromptDB) -> dict[str, Any]:
    import ray

    from transformllm_ray.convert.regex_engine import RegexConverter

    c = cfg.convert
    ds = ray.data.read_parquet(files, columns=CHUNK_COLUMNS)
    ds = ds.map_batches(keep_ids, fn_kwargs={"todo": todo}, batch_format="pyarrow", num_cpus=0.1)
    ds = ds.repartition(target_num_rows_per_block=max(1, c.rows_per_file))
    ds = ds.map_batches(RegexConverter, fn_constructor_kwargs={
        "domain": c.domain, "version": c.prompt_version, "tasks_per_chunk": c.tasks_per_chunk, "seed": cfg.seed},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5, batch_size=64)
    committer = Committer(ledger, c.rows_per_file, 1)
    base = {"engine": "regex", "model": "regex", "model_revision": db.version_tag, "prompt_version": db.version_tag}

    def rows():
        for r in ds.iter_rows():
            if r["status"] == "ok":
                yield "converted", {
                    "id": r["id"], "doc_id": r["doc_id"], "text": r["text"], "raw_output": r["raw_output"],
                    "task_families": r["task_families"], **base, "sampling": "{}", "input_tokens": 0,
                    "output_tokens": 0, "finish_reason": r["finish_reason"], "status": "ok", "attempts": 1,
                    "seconds": 0.0}
            else:
                yield "reject", make_reject(STAGE, r["id"], r["status"], r["detail"], r["excerpt"], EXCERPT).__dict__

    t0 = time.time()
    for kind, row in rows():
        committer.add(kind, row)  # regex rows carry no engine tokens
    committer.flush()
    return {"seconds": time.time() - t0, "commits": committer.commits, "input_tokens": 0, "output_tokens": 0,
            **{f"chunks_{k}": v for k, v in committer.counts.items()}}


# ------------------------------------------------------------------------------------------- run
def reconcile(ledger: Ledger, selected: list[str]) -> dict[str, Any]:
    """Counts read back from the committed files; fails unless every selected id is in exactly one row."""
    keys = [m["key"] for m in ledger.markers()]
    conv = [f"{ledger.out}/converted/part-{k}.parquet" for k in keys]
    rej = [f"{ledger.out}/rejects/part-{k}.parquet" for k in keys]
    conv = [u for u in conv if exists(u)]
    rej = [u for u in rej if exists(u)]
    c = read_parquet(conv, columns=["id", "output_tokens", "attempts"]) if conv else None
    r = read_parquet(rej, columns=["ref", "reason"]) if rej else None
    ok_ids = c["id"].to_pylist() if c is not None else []
    rej_ids = r["ref"].to_pylist() if r is not None else []
    both = ok_ids + rej_ids
    counts = collections.Counter(both)
    dup = [i for i, n in counts.items() if n > 1]
    missing = set(selected) - set(counts)
    extra = set(counts) - set(selected)
    if dup or missing or extra:
        raise RuntimeError(f"convert: output does not hold each selected chunk exactly once: {len(dup)} twice, "
                           f"{len(missing)} missing, {len(extra)} not selected (e.g. {(dup or sorted(missing) or sorted(extra))[:3]})")
    reasons = collections.Counter(r["reason"].to_pylist()) if r is not None else collections.Counter()
    return {"rows_out": len(ok_ids), "rows_rejected": len(rej_ids), "reject_reasons": dict(sorted(reasons.items())),
            "output_tokens_ok": int(sum(c["output_tokens"].to_pylist())) if c is not None else 0,
            "ok_after_retry": sum(1 for a in c["attempts"].to_pylist() if a > 1) if c is not None else 0,
            "files": len(conv) + len(rej)}


def run(cfg: Config) -> dict:
    t0 = time.time()
    c = cfg.convert
    db = load_prompts(c.domain, c.prompt_version)
    sample_families("check", c.tasks_per_chunk, db.family_names)  # fails early if tasks_per_chunk > families
    ledger = Ledger(cfg.stage_dir(STAGE), stage_fingerprint(cfg, STAGE))
    removed = ledger.recover()
    files, selected, sel_stats = select_chunks(cfg)
    sel = set(selected)
    done, pending = ledger.state()
    done, pending = done & sel, (pending & sel) - done
    todo = [i for i in selected if i not in done and i not in pending]
    if done or pending or removed:
        print(f"[convert] resuming: {len(done)} chunks already done, {len(pending)} waiting for their retry, "
              f"{removed} uncommitted files removed", flush=True)
    print(f"[convert] engine {c.engine}: {len(selected)} chunks selected ({sel_stats['heldout_chunks']} held out, "
          f"{sel_stats['beyond_max_chunks']} beyond convert.max_chunks), {len(todo)} to convert", flush=True)

    passes: list[dict] = []
    extra: dict[str, Any] = {"engine": c.engine, "prompt_version": db.version_tag, "resumed_done": len(done),
                             "resumed_pending": len(pending), "retried_chunks": 0}
    if c.engine == "regex":
        extra.update(model="regex", model_revision=db.version_tag, device="cpu")
        if todo:
            passes.append(regex_pass(cfg, files, todo, ledger, db))
    else:
        from transformllm_ray.convert.vllm_engine import check_cpus, resolve_device
        from transformllm_ray.models.assets import model_revision, resolve_model

        model_path = resolve_model(c.model)
        revision = model_revision(c.model, c.model_revision)
        device = resolve_device(c.vllm.device)
        check_cpus(cfg, device)
        extra.update(model=c.model, model_revision=revision, device=device)
        if todo:
            print(f"[convert] pass 1: {len(todo)} chunks x {c.tasks_per_chunk} tasks on {c.vllm.num_engines} "
                  f"{device} engine(s) of {c.model}", flush=True)
            passes.append(vllm_pass(cfg, files, todo, 1, ledger, db, model_path, device, revision))
        if c.retry_rejected:
            now_done, now_pending = ledger.state()
            retry = sorted((now_pending - now_done) & sel)
            if retry:
                print(f"[convert] pass 2: retrying the failed tasks of {len(retry)} chunks with "
                      "convert.retry_sampling", flush=True)
                extra["retried_chunks"] = len(retry)
                passes.append(vllm_pass(cfg, ledger.pending_files(), retry, 2, ledger, db, model_path, device,
                                        revision))
    final = reconcile(ledger, selected)
    markers = ledger.markers()
    run_out = sum(p["output_tokens"] for p in passes)
    run_secs = sum(p["seconds"] for p in passes)
    stats = {
        "rows_in": len(selected), **final, **sel_stats, **extra,
        # Engine tokens of all committed work (every pass, every run), from the commit markers.
        "input_tokens": sum(int(m.get("input_tokens", 0)) for m in markers),
        "output_tokens": sum(int(m.get("output_tokens", 0)) for m in markers),
        # Throughput of this invocation: tokens it generated / wall time of its passes (engine start-up and
        # Ray Data included; a resumed run reports only its own part).
        "output_tokens_this_run": run_out,
        "output_tokens_per_s": round(run_out / run_secs, 2) if run_secs > 0 else 0.0,
        "engine_seconds": round(run_secs, 3),
        "seconds_to_first_output": round(passes[0].get("seconds_to_first_output", 0.0), 3) if passes else 0.0,
        "prompts_truncated": sum(p.get("prompts_truncated", 0) for p in passes),
        "engine_errors": sum(p.get("engine_errors", 0) for p in passes),
        "commits": len(markers), "rows_per_file": c.rows_per_file, "tasks_per_chunk": c.tasks_per_chunk,
        "sampling": c.sampling.model_dump(), "seconds": round(time.time() - t0, 3),
    }
    return write_stats(cfg, STAGE, stats)
