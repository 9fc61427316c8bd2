"""Convert with the vLLM engine, driver side: task rows out of the engines -> finished chunks -> commits.

    stats = engine_pass(cfg, chunk_rows_ds, todo, attempt=1, ledger=ledger, db=db, engine={"kind": "vllm", ...})

One pass: chunk rows -> task rows -> PromptBuilder -> clients of the Serve LLM engines -> QualityGate (vllm_engine.py),
or task rows -> OpenAIChat clients of an endpoint (openai_engine.py); all in Ray Data. The driver iterates the gated task rows; a chunk is finished when all its task rows are in
(`ChunkAssembler`, which ignores rows a retried engine batch delivers twice), and is then converted, rejected
or (first attempt with `convert.retry_rejected`) pending its retry. `Committer` commits every
`convert.rows_per_file` finished chunks through the ledger (ledger.py: atomic, exactly once). Memory: the
task rows of the chunks in flight and one commit's rows, whatever the corpus size.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Iterable

from transformllm_ray.config import Config
from transformllm_ray.console import Progress, progress
from transformllm_ray.convert.config import ConvertConfig, cost_of
from transformllm_ray.convert.format import training_text
from transformllm_ray.convert.ledger import EXCERPT, STAGE, Ledger
from transformllm_ray.convert.prompts import PromptDB
from transformllm_ray.resources import SMALL_STAGE_CPUS
from transformllm_ray.schema import make_reject

log = logging.getLogger("transformllm")
DONE_MEMORY = 65536
"""(chunk, attempt) pairs the assembler remembers as finished, to ignore task rows that a retried engine
batch delivers again: retries come within a batch or two, so a bounded window suffices."""


def task_result(row: dict[str, Any]) -> dict[str, Any]:
    """A gated task row, or an engine-error row (which bypassed the gate), as one plain task result."""
    err = row.get("__inference_error__") or ""
    base = {"task_index": int(row["task_index"]), "family": str(row["family"]), "words": str(row.get("words") or ""),
            "attempt": int(row["attempt"]), "sampling": json.loads(str(row["sampling"])),
            "prompt_truncated": bool(row.get("prompt_truncated", False))}
    if err:
        return {**base, "output": "", "status": "engine_error", "detail": str(err)[:500], "finish_reason": "error",
                "input_tokens": 0, "output_tokens": 0, "response_id": ""}
    return {**base, "output": str(row["output"]), "status": str(row["status"]), "detail": str(row["detail"]),
            "finish_reason": str(row["finish_reason"]), "input_tokens": int(row["input_tokens"]),
            "output_tokens": int(row["output_tokens"]), "response_id": str(row.get("response_id") or "")}


class ChunkAssembler:
    """Collects the task rows of each chunk (in any order, duplicates from retried engine batches ignored)
    and, once a chunk has all of them, classifies it: converted, reject, or pending (retry later)."""

    def __init__(self, cfg: Config, db: PromptDB, engine: str, model: str, model_revision: str):
        self.cfg, self.db = cfg, db
        self.base = {"engine": engine, "model": model, "model_revision": model_revision,
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
                "response_ids": json.dumps([t["response_id"] for t in final]),
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


# ------------------------------------------------------------------------------------------- cost
class BudgetReached(RuntimeError):
    """convert.max_cost reached: the finished work is committed; a rerun with a higher budget continues."""


def engine_seconds(marker: dict) -> float:
    """Engine wall time a commit accounts for: since the previous commit or the pass's start (engine start-up
    included: it is paid for too)."""
    return float(marker.get("engine_seconds", marker.get("seconds", 0.0)))


class Budget:
    """What the committed work of this output cost (its commit markers: every pass, every run), against
    `convert.max_cost`. Tokens at `convert.cost` prices; engine time from the markers (engine_seconds)."""

    def __init__(self, c: ConvertConfig, markers: list[dict]):
        self.c = c
        self.spent = 0.0
        for m in markers:
            self.add(m)

    def add(self, info: dict) -> None:
        self.spent += cost_of(self.c, float(info.get("input_tokens", 0)), float(info.get("output_tokens", 0)),
                              engine_seconds(info))

    @property
    def priced(self) -> bool:
        p = self.c.cost
        return bool(p.input_per_million or p.output_per_million or p.gpu_hour)

    def exhausted(self) -> bool:
        return self.c.max_cost is not None and self.spent >= self.c.max_cost

    def stop(self, done: int) -> BudgetReached:
        cur = self.c.cost.currency
        return BudgetReached(f"convert.max_cost reached: {self.spent:,.4f} {cur} spent of {self.c.max_cost:,.4f} "
                             f"{cur}; {done} chunks committed. Rerun with a higher convert.max_cost to continue.")


# ------------------------------------------------------------------------------------------- committing
class Committer:
    """Buffers finished chunks and commits them `rows_per_file` at a time through the ledger."""

    def __init__(self, ledger: Ledger, rows_per_file: int, attempt: int, budget: Budget | None = None):
        self.ledger, self.n, self.attempt, self.budget = ledger, rows_per_file, attempt, budget
        self.buf: dict[str, list[dict]] = {"converted": [], "reject": [], "pending": []}
        self.tokens: collections.Counter[str] = collections.Counter()
        self.t_last: float | None = None  # set at the pass's first output: start-up is not per-row time
        self.t_engine = time.time()  # engine time for the cost: since the pass began, start-up included
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
        info = {"attempt": self.attempt, "seconds": round(now - start, 3),
                "engine_seconds": round(now - self.t_engine, 3),
                "input_tokens": self.tokens["input_tokens"], "output_tokens": self.tokens["output_tokens"]}
        self.ledger.commit(self.buf["converted"], self.buf["reject"], self.buf["pending"], info)
        if self.budget is not None:
            self.budget.add(info)
        self.commits += 1
        log.info("convert pass %d: committed %d chunks (ok %d, rejected %d, to retry %d)", self.attempt, rows,
                 len(self.buf["converted"]), len(self.buf["reject"]), len(self.buf["pending"]))
        self.t_last = self.t_engine = now
        self.buf = {"converted": [], "reject": [], "pending": []}
        self.tokens = collections.Counter()


def consume(rows: Iterable[dict], assembler: ChunkAssembler, committer: Committer,
            bar: Progress | None = None) -> dict[str, float]:
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
            budget = committer.budget
            if bar is not None:
                bar.update(1, tokens=done[2]["output_tokens"])
                if budget is not None and budget.priced:
                    bar.counters["cost"] = budget.spent  # committed work: what the budget counts
            if budget is not None and budget.exhausted():  # checked after a commit, never before the last one
                raise budget.stop(committer.ledger.counts()[0])
    committer.flush()
    if assembler.incomplete():
        raise RuntimeError(f"convert: {assembler.incomplete()} chunks lack task results after the engine pass "
                           "(rows lost by the engine pipeline); rerun to redo them")
    end = time.time()
    return {"seconds": end - t0, "seconds_to_first_output": (first or end) - t0}


def engine_pass(cfg: Config, ds, todo: int, attempt: int, ledger: Ledger, db: PromptDB,
                engine: dict[str, Any], budget: Budget | None = None) -> dict[str, Any]:
    """One pass of chunk rows through an LLM engine: `engine` = {kind: vllm|openai, model, revision, prompts
    (prompts.prompt_spec), and for vllm device and app (the running vllm_engine.EngineService's name)}."""
    from transformllm_ray.convert.vllm_engine import engine_pipeline, expand_tasks, sampling_dict

    c = cfg.convert
    sampling = sampling_dict(c.sampling if attempt == 1 else c.retry_sampling)
    ds = ds.map_batches(expand_tasks, fn_kwargs={
        "prompts": engine["prompts"], "tasks_per_chunk": c.tasks_per_chunk,
        "seed": cfg.seed, "sampling": sampling, "attempt": attempt}, batch_format="numpy", num_cpus=SMALL_STAGE_CPUS)
    if engine["kind"] == "openai":
        from transformllm_ray.convert.openai_engine import endpoint_pipeline

        out = endpoint_pipeline(ds, cfg, engine["prompts"])
    else:
        out = engine_pipeline(ds, cfg, engine["model"], engine["device"], engine["prompts"], engine["app"])
    assembler = ChunkAssembler(cfg, db, engine["kind"], engine["model"], engine["revision"])
    committer = Committer(ledger, c.rows_per_file, attempt, budget)
    committer.t_engine = engine.pop("since", committer.t_engine)  # engine start-up before the first pass
    with progress(STAGE, todo, f"chunks (pass {attempt})") as bar:
        timing = consume(out.iter_rows(), assembler, committer, bar)
    return {**timing, "input_tokens": assembler.tokens["input"], "output_tokens": assembler.tokens["output"],
            "prompts_truncated": assembler.tokens["truncated"], "engine_errors": assembler.tokens["engine_errors"],
            "commits": committer.commits, **{f"chunks_{k}": v for k, v in committer.counts.items()}}
