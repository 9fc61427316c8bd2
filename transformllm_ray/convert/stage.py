"""Convert stage: ingest's chunks -> reading-comprehension training text (`converted/`) and `rejects/`.

    transformllm convert --config configs/debug-local.yaml
    transformllm convert --config configs/debug-local.yaml convert.engine=regex convert.max_chunks=100

Selection (select.py). The domain chunks of `ingest/chunks/` whose `split` is not heldout (the eval set, never
converted), in id order, the first `convert.max_chunks`: one scalar threshold id, no id list on the driver or
in any task. rows_in = that selection; held-out and beyond-max chunks are reported as stats, not as rejects.

Resume. `Ledger.recover()` drops files of an unfinished commit; ids already committed are subtracted by a
Ray Data anti-join (select.anti_join); ids whose first attempt is committed in pending/ go straight to the
retry pass. Finished work is not redone.

Conversion (Ray Data, streaming). engine vllm: chunk rows -> task rows -> PromptBuilder -> ray.data.llm vLLM
engines -> QualityGate (vllm_engine.py). The driver iterates the output; a chunk is finished when all its task
rows are in; every `convert.rows_per_file` finished chunks are committed atomically (ledger.py). engine regex:
one chunk is one row, so workers convert and commit batches of `convert.rows_per_file` themselves
(RegexCommitStage) and the driver only counts narrow (id, status) rows. With `convert.retry_rejected`, chunks with an answer
that failed the quality gate are committed to pending/ and, after the first pass, their failed tasks run
once more with `convert.retry_sampling` (a second engine start-up, paid once per run, not per chunk).

Accounting. Counts are read back from the committed files by workers, not from memory; every selected chunk
id must be in exactly one converted/ or rejects/ row (a group-by over ids, select.check_exactly_once), else
the stage fails before writing stats.json (its completion marker): rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Iterable

from transformllm_ray.config import Config
from transformllm_ray.convert.format import training_text
from transformllm_ray.convert.ledger import PENDING_SCHEMA, Ledger
from transformllm_ray.convert.prompts import PromptDB, load_prompts, sample_families
from transformllm_ray.convert.select import (
    Selection, anti_join, check_exactly_once, chunk_schema, chunks_ds, selection,
)
from transformllm_ray.dataops import BatchUDF, map_files
from transformllm_ray.schema import make_reject
from transformllm_ray.stage import stage_fingerprint, write_stats
from transformllm_ray.storage import read_parquet

log = logging.getLogger("transformllm")
STAGE = "convert"


def inputs(cfg: Config) -> dict:
    """What convert's output depends on (stage.py): the selection, the prompts, the seed and, for the vLLM
    engine, the model, decoding, quality gate and the engine settings that change outputs (not its size:
    engines, batch sizes, CPUs, restarts; nor rows_per_file, which only groups commits)."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import section

    c = cfg.convert
    out = {"seed": cfg.seed, **section(c, "convert", exclude=[
        "model", "model_revision", "sampling", "retry_sampling", "quality", "vllm", "rows_per_file",
        "retry_rejected"])}
    if c.engine == "regex":  # one deterministic regex pass: no model, decoding, gate or retry
        return out
    out.update({"convert.model": model_key(c.model, c.model_revision), "convert.retry_rejected": c.retry_rejected,
                **section(c.sampling, "convert.sampling"), **section(c.quality, "convert.quality"),
                **section(c.vllm, "convert.vllm", exclude=[
                    "num_engines", "batch_size", "gpu_memory_utilization", "cpu_kvcache_gib", "cpus_per_engine",
                    "max_restarts", "max_concurrent_batches", "enforce_eager", "env"])})
    if c.retry_rejected:
        out.update(section(c.retry_sampling, "convert.retry_sampling"))
    return out
EXCERPT = 200
DONE_MEMORY = 65536
"""(chunk, attempt) pairs the assembler remembers as finished, to ignore task rows that a retried engine
batch delivers again: retries come within a batch or two, so a bounded window suffices."""


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
        self.done: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.tokens: collections.Counter[str] = collections.Counter()

    def add(self, row: dict[str, Any]) -> tuple[str, dict, dict] | None:
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
        self.meta.setdefault(cid, {"doc_id": str(row["doc_id"]), "split": str(row["split"]),
                                   "text": str(row["chunk_text"]),
                                   "prev": str(row.get("prev") or ""), "n": int(row["n_tasks"])})
        if len(tasks) < self.meta[cid]["n"]:
            return None
        self.done[(cid, attempt)] = None
        if len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        meta = self.meta.pop(cid)
        new = [tasks[i] for i in sorted(self.open.pop(cid))]
        spent = {"input_tokens": sum(t["input_tokens"] for t in new),
                 "output_tokens": sum(t["output_tokens"] for t in new)}
        kind, out = self.classify(cid, meta, new, attempt)
        return kind, out, spent

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
                "id": cid, "doc_id": meta["doc_id"], "split": meta["split"], "text": training_text(meta["text"], q, self.db),
                "raw_output": json.dumps([t["output"] for t in final], ensure_ascii=False),
                "task_families": ",".join(t["family"] for t in final), **self.base,
                "sampling": json.dumps([t["sampling"] for t in final], sort_keys=True),
                "input_tokens": sum(t["input_tokens"] for t in spent),
                "output_tokens": sum(t["output_tokens"] for t in spent),
                "finish_reason": ",".join(t["finish_reason"] for t in final), "status": "ok",
                "attempts": max(t["attempt"] for t in final), "seconds": 0.0}
        retryable = attempt == 1 and self.cfg.convert.retry_rejected and all(t["status"] != "engine_error" for t in bad)
        if retryable:
            return "pending", {"id": cid, "doc_id": meta["doc_id"], "split": meta["split"], "text": meta["text"],
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
        self.tokens: collections.Counter[str] = collections.Counter()
        self.t_last: float | None = None  # set at the pass's first output: start-up is not per-row time
        self.commits = 0
        self.counts: collections.Counter[str] = collections.Counter()

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
        start = now if self.t_last is None else self.t_last
        # Amortised wall time per chunk: time since the previous commit (the first: since the pass's first
        # output), shared by this commit's rows. Their sum over a pass is the pass's time after start-up.
        per_row = (now - start) / rows
        for r in self.buf["converted"]:
            r["seconds"] = round(per_row, 4)
        self.ledger.commit(self.buf["converted"], self.buf["reject"], self.buf["pending"],
                           {"attempt": self.attempt, "seconds": round(now - start, 3),
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
def todo_ds(sel: Selection, ledger: Ledger, resuming: bool):
    """Pass 1 input: the selected chunk rows, minus the committed ones when resuming."""
    ds = chunks_ds(sel)
    done = ledger.done_ids_ds() if resuming else None
    return anti_join(ds, done, chunk_schema()) if done is not None else ds


def retry_ds(ledger: Ledger):
    """Pass 2 input: committed pending/ rows (first attempts that failed the gate) not yet done."""
    ds = map_files(ledger.pending_files(), read_parquet)
    if ds is None:
        return None
    done = ledger.done_ids_ds()
    return anti_join(ds, done, PENDING_SCHEMA) if done is not None else ds


def vllm_pass(cfg: Config, ds, attempt: int, ledger: Ledger, db: PromptDB, model_path: str, device: str,
              revision: str) -> dict[str, Any]:
    from transformllm_ray.convert.vllm_engine import engine_pipeline, expand_tasks, sampling_dict

    c = cfg.convert
    sampling = sampling_dict(c.sampling if attempt == 1 else c.retry_sampling)
    ds = ds.map_batches(expand_tasks, fn_kwargs={
        "domain": c.domain, "version": c.prompt_version, "tasks_per_chunk": c.tasks_per_chunk,
        "seed": cfg.seed, "sampling": sampling, "attempt": attempt}, batch_format="numpy", num_cpus=0.1)
    out = engine_pipeline(ds, cfg, c.model, model_path, device)
    assembler = ChunkAssembler(cfg, db, revision)
    committer = Committer(ledger, c.rows_per_file, attempt)
    timing = consume(out.iter_rows(), assembler, committer)
    return {**timing, "input_tokens": assembler.tokens["input"], "output_tokens": assembler.tokens["output"],
            "prompts_truncated": assembler.tokens["truncated"], "engine_errors": assembler.tokens["engine_errors"],
            "commits": committer.commits, **{f"chunks_{k}": v for k, v in committer.counts.items()}}


class RegexCommitStage(BatchUDF):
    """Ray Data stage (engine regex): a batch of chunk rows in, converted and committed by this worker as one
    ledger commit (`convert.rows_per_file` rows); one narrow row per chunk out (id, status, commit key).

    The converted text never travels to the driver: it only counts the narrow rows. A retried task converts
    the same rows into the same commit key and overwrites the same files; a rerun after a kill gets only
    uncommitted ids (anti-join), so commits never share an id. Input columns: those of RegexConverter."""

    input_columns = ("id", "doc_id", "split", "text", "position", "metadata")

    def __init__(self, out_dir: str, fingerprint: str, domain: str, version: str, tasks_per_chunk: int,
                 seed: int):
        from transformllm_ray.convert.regex_engine import RegexConverter

        self.conv = RegexConverter(domain, version, tasks_per_chunk, seed)
        self.ledger = Ledger(out_dir, fingerprint)
        tag = self.conv.db.version_tag
        self.base = {"engine": "regex", "model": "regex", "model_revision": tag, "prompt_version": tag}

    def map(self, batch: dict[str, Any]) -> dict[str, list]:
        t0 = time.time()
        res = self.conv(batch)
        n = len(batch["id"])
        converted, rejects = [], []
        for i in range(n):
            r = {k: v[i] for k, v in res.items()}
            if r["status"] == "ok":
                converted.append({
                    "id": r["id"], "doc_id": r["doc_id"], "split": r["split"], "text": r["text"],
                    "raw_output": r["raw_output"], "task_families": r["task_families"], **self.base,
                    "sampling": "{}", "input_tokens": 0, "output_tokens": 0, "finish_reason": r["finish_reason"],
                    "status": "ok", "attempts": 1, "seconds": round(r["gen_seconds"], 4)})
            else:
                rejects.append(make_reject(STAGE, r["id"], r["status"], r["detail"], r["excerpt"], EXCERPT).__dict__)
        key = self.ledger.commit(converted, rejects, [], {"attempt": 1, "seconds": round(time.time() - t0, 3),
                                                          "input_tokens": 0, "output_tokens": 0})
        return {"id": list(res["id"]), "status": list(res["status"]), "commit": [key] * n}


def regex_pass(cfg: Config, ds, ledger: Ledger, db: PromptDB) -> dict[str, Any]:
    import ray

    c = cfg.convert
    ds = ds.map_batches(RegexCommitStage, fn_constructor_kwargs={
        "out_dir": ledger.out, "fingerprint": ledger.fingerprint, "domain": c.domain, "version": c.prompt_version,
        "tasks_per_chunk": c.tasks_per_chunk, "seed": cfg.seed},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5, batch_size=max(1, c.rows_per_file))
    t0 = time.time()
    counts: collections.Counter = collections.Counter()
    commits = set()
    for batch in ds.select_columns(["status", "commit"]).iter_batches(batch_format="pyarrow", batch_size=None):
        st = batch["status"].to_pylist()
        counts["converted"] += sum(1 for x in st if x == "ok")
        counts["reject"] += sum(1 for x in st if x != "ok")
        commits.update(batch["commit"].to_pylist())
    print(f"[convert] regex: {counts['converted']} chunks converted, {counts['reject']} rejected, "
          f"{len(commits)} commits", flush=True)
    return {"seconds": time.time() - t0, "commits": len(commits), "input_tokens": 0, "output_tokens": 0,
            **{f"chunks_{k}": v for k, v in counts.items()}}


# ------------------------------------------------------------------------------------------- run
def _output_counts(uri: str, kind: str):
    """One committed part's counts: converted -> (rows, output tokens, ok after retry); rejects -> per reason."""
    import pyarrow as pa

    if kind == "converted":
        t = read_parquet(uri, columns=["output_tokens", "attempts"])
        return pa.table({"key": ["ok"], "rows": [t.num_rows], "output_tokens": [sum(t["output_tokens"].to_pylist())],
                         "retried": [sum(1 for a in t["attempts"].to_pylist() if a > 1)]})
    reasons = collections.Counter(read_parquet(uri, columns=["reason"])["reason"].to_pylist())
    return pa.table({"key": list(reasons), "rows": list(reasons.values()), "output_tokens": [0] * len(reasons),
                     "retried": [0] * len(reasons)},
                    schema=pa.schema([("key", pa.string()), ("rows", pa.int64()), ("output_tokens", pa.int64()),
                                      ("retried", pa.int64())]))


def reconcile(ledger: Ledger, sel: Selection) -> dict[str, Any]:
    """Counts read back from the committed files by workers; fails unless every selected id is in exactly one
    row (select.check_exactly_once)."""
    conv, rej = ledger.part_files("converted"), ledger.part_files("rejects")
    check_exactly_once(sel, conv, rej, ledger.out)
    ok = out_tokens = retried = 0
    reasons: collections.Counter = collections.Counter()
    for kind, files in (("converted", conv), ("rejects", rej)):
        ds = map_files(files, _output_counts, {"kind": kind})
        for r in ds.iter_rows() if ds is not None else []:
            if kind == "converted":
                ok += int(r["rows"])
                out_tokens += int(r["output_tokens"])
                retried += int(r["retried"])
            else:
                reasons[r["key"]] += int(r["rows"])
    return {"rows_out": ok, "rows_rejected": sum(reasons.values()), "reject_reasons": dict(sorted(reasons.items())),
            "output_tokens_ok": out_tokens, "ok_after_retry": retried, "files": len(conv) + len(rej)}


def run(cfg: Config) -> dict:
    t0 = time.time()
    c = cfg.convert
    db = load_prompts(c.domain, c.prompt_version)
    sample_families("check", c.tasks_per_chunk, db.family_names)  # fails early if tasks_per_chunk > families
    ledger = Ledger(cfg.stage_dir(STAGE), stage_fingerprint(cfg, STAGE))
    removed = ledger.recover()
    sel = selection(cfg)
    done, pending = ledger.counts()
    n_todo = sel.selected - done - pending
    if done or pending or removed:
        print(f"[convert] resuming: {done} chunks already done, {pending} waiting for their retry, "
              f"{removed} uncommitted files removed", flush=True)
    print(f"[convert] engine {c.engine}: {sel.selected} chunks selected ({sel.stats['heldout_chunks']} held out, "
          f"{sel.stats['beyond_max_chunks']} beyond convert.max_chunks), {n_todo} to convert", flush=True)

    passes: list[dict] = []
    extra: dict[str, Any] = {"engine": c.engine, "prompt_version": db.version_tag, "resumed_done": done,
                             "resumed_pending": pending, "retried_chunks": 0}
    resuming = bool(done or pending)
    if c.engine == "regex":
        extra.update(model="regex", model_revision=db.version_tag, device="cpu")
        if n_todo:
            passes.append(regex_pass(cfg, todo_ds(sel, ledger, resuming), ledger, db))
    else:
        from transformllm_ray.convert.vllm_engine import check_cpus, resolve_device
        from transformllm_ray.models.assets import model_revision, resolve_model

        model_path = resolve_model(c.model)
        revision = model_revision(c.model, c.model_revision)
        device = resolve_device(c.vllm.device)
        check_cpus(cfg, device)
        extra.update(model=c.model, model_revision=revision, device=device)
        if n_todo:
            print(f"[convert] pass 1: {n_todo} chunks x {c.tasks_per_chunk} tasks on {c.vllm.num_engines} "
                  f"{device} engine(s) of {c.model}", flush=True)
            passes.append(vllm_pass(cfg, todo_ds(sel, ledger, resuming), 1, ledger, db, model_path, device,
                                    revision))
        if c.retry_rejected:
            _, waiting = ledger.counts()
            if waiting:
                print(f"[convert] pass 2: retrying the failed tasks of {waiting} chunks with "
                      "convert.retry_sampling", flush=True)
                extra["retried_chunks"] = waiting
                passes.append(vllm_pass(cfg, retry_ds(ledger), 2, ledger, db, model_path, device, revision))
    final = reconcile(ledger, sel)
    markers = ledger.markers()
    run_out = sum(p["output_tokens"] for p in passes)
    run_secs = sum(p["seconds"] for p in passes)
    stats = {
        "rows_in": sel.selected, **final, **sel.stats, **extra,
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
