"""Convert stage: ingest's chunks -> reading-comprehension training text (`converted/`) and `rejects/`.

    transformllm convert --config configs/debug-local.yaml
    transformllm convert --config configs/debug-local.yaml convert.engine=regex convert.max_chunks=100

Selection (select.py). The domain chunks of `ingest/chunks/` whose `split` is not heldout (the eval set, never
converted), in id order, the first `convert.max_chunks`: one scalar threshold id, no id list on the driver or
in any task. rows_in = that selection; held-out and beyond-max chunks are reported as stats, not as rejects.

Resume. `Ledger.recover()` drops files of an unfinished commit; ids already committed are subtracted by a
Ray Data anti-join (select.anti_join); ids whose first attempt is committed in pending/ go straight to the
retry pass. Finished work is not redone.

Conversion (Ray Data, streaming). engine vllm: chunk rows -> task rows -> ray.data.llm vLLM engines -> quality
gate (vllm_engine.py); the driver assembles finished chunks from the task rows and commits every
`convert.rows_per_file` of them atomically (assemble.py, ledger.py). engine regex: one chunk is one row, so
workers convert and commit batches of `convert.rows_per_file` themselves (regex_engine.RegexCommitStage) and
the driver only counts narrow (id, status) rows. With `convert.retry_rejected`, chunks with an answer that
failed the quality gate are committed to pending/ and, after the first pass, their failed tasks run once more
with `convert.retry_sampling`. Devices and resource asks: resources.py.

Accounting. Counts are read back from the committed files by workers, not from memory; every selected chunk
id must be in exactly one converted/ or rejects/ row (a group-by over ids, select.check_exactly_once), else
the stage fails before writing stats.json (its completion marker): rows_in = rows_out + rows_rejected
(ledger.reconcile).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import Any

from transformllm_ray.config import Config
from transformllm_ray.console import say
from transformllm_ray.convert.assemble import Budget, BudgetReached, engine_pass, engine_seconds
from transformllm_ray.convert.card import write_card
from transformllm_ray.convert.ledger import PENDING_SCHEMA, SCHEMA_VERSION, STAGE, Ledger, reconcile
from transformllm_ray.convert.prompts import db_of, prompt_spec, sample_families
from transformllm_ray.convert.regex_engine import regex_pass
from transformllm_ray.convert.select import Selection, anti_join, chunk_schema, chunks_ds, selection
from transformllm_ray.dataops import map_files
from transformllm_ray.resources import check_convert_room, cluster_gpus, convert_device
from transformllm_ray.stage import stage_fingerprint, write_stats
from transformllm_ray.storage import read_parquet

log = logging.getLogger("transformllm")


def inputs(cfg: Config) -> dict:
    """What convert's output depends on (stage.py): the selection, the prompts, the seed and, for the vLLM
    engine, the model, decoding, quality gate and the engine settings that change outputs (not its size:
    engines, batch sizes, CPUs, restarts; nor rows_per_file, which only groups commits)."""
    from transformllm_ray.models.assets import model_key
    from transformllm_ray.stage import section

    c = cfg.convert
    spec = prompt_spec(c.prompts, c.domain, c.prompt_version)
    out = {"seed": cfg.seed, "convert.schema": SCHEMA_VERSION,
           # the prompt database by content: a user's file is hashed, not its path
           "convert.prompts": db_of(spec).version_tag, "convert.prompts_sha256": hashlib.sha256(
               spec["text"].encode()).hexdigest(),
           **section(c, "convert", exclude=[
               "model", "model_revision", "sampling", "retry_sampling", "quality", "vllm", "openai", "rows_per_file",
               "retry_rejected", "prompts", "domain", "prompt_version", "cost", "max_cost"])}
    if c.engine == "regex":  # one deterministic regex pass: no model, decoding, gate or retry
        return out
    # The endpoint's address, key, clients and limits change how fast, not what: the served model name does.
    model = (c.openai.model or c.model) if c.engine == "openai" else model_key(c.model, c.model_revision)
    out.update({"convert.model": model, "convert.retry_rejected": c.retry_rejected,
                **section(c.sampling, "convert.sampling"), **section(c.quality, "convert.quality"),
                **(section(c.vllm, "convert.vllm", exclude=[
                    "num_engines", "batch_size", "gpu_memory_utilization", "cpu_kvcache_gib", "cpus_per_engine",
                    "max_restarts", "max_concurrent_batches", "enforce_eager", "env"]) if c.engine == "vllm" else {})})
    if c.retry_rejected:
        out.update(section(c.retry_sampling, "convert.retry_sampling"))
    return out


# ------------------------------------------------------------------------------------------- passes
def todo_ds(sel: Selection, ledger: Ledger, resuming: bool):
    """Pass 1 input: the selected chunk rows, minus the committed ones (done or waiting for their retry) when
    resuming."""
    ds = chunks_ds(sel)
    done = ledger.done_ids_ds(with_pending=True) if resuming else None
    return anti_join(ds, done, chunk_schema()) if done is not None else ds


def retry_ds(ledger: Ledger):
    """Pass 2 input: committed pending/ rows (first attempts that failed the gate) not yet done."""
    ds = map_files(ledger.pending_files(), read_parquet)
    if ds is None:
        return None
    done = ledger.done_ids_ds()
    return anti_join(ds, done, PENDING_SCHEMA) if done is not None else ds


def _retry(cfg: Config, ledger: Ledger, db, engine: dict, extra: dict, budget: Budget) -> list[dict]:
    """Pass 2 (with convert.retry_rejected): the failed tasks of the pending chunks, with retry_sampling."""
    if not cfg.convert.retry_rejected:
        return []
    _, waiting = ledger.counts()
    if not waiting:
        return []
    say(f"[convert] pass 2: retrying the failed tasks of {waiting} chunks with convert.retry_sampling")
    extra["retried_chunks"] = waiting
    return [_pass(cfg, lambda: (retry_ds(ledger), ledger.counts()[1]), 2, ledger, db, engine, budget, extra)]


def _pass(cfg: Config, todo, attempt: int, ledger: Ledger, db, engine: dict, budget: Budget, extra: dict) -> dict:
    """One engine pass; should an engine replica die in it (killed, OOM, node lost), Serve restarts it and the
    pass is redone from the ledger: committed chunks are kept, only the uncommitted ones run again (at most
    `vllm.max_restarts` times per pass; -1: no limit). `todo()` -> (input dataset, chunks), read afresh."""
    service = engine.get("service")
    limit = cfg.convert.vllm.max_restarts
    while True:
        ds, n = todo()
        try:
            return engine_pass(cfg, ds, n, attempt, ledger, db, engine, budget)
        except BudgetReached:
            raise
        except Exception as e:
            if service is None or not service.lost(e) or (0 <= limit <= extra["engine_restarts"]):
                raise
            extra["engine_restarts"] += 1
            log.warning("convert pass %d: engine lost (%s: %s)", attempt, type(e).__name__, str(e)[:2000])
            say(f"[convert] pass {attempt}: an engine was lost; redoing its uncommitted chunks once Serve has "
                f"restarted it ({extra['engine_restarts']} so far)")
            service.wait_ready()
            ledger.recover()


# ------------------------------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    t0 = time.time()
    c = cfg.convert
    spec = prompt_spec(c.prompts, c.domain, c.prompt_version)
    db = db_of(spec)
    sample_families("check", c.tasks_per_chunk, db.family_names)  # fails early if tasks_per_chunk > families
    ledger = Ledger(cfg.stage_dir(STAGE), stage_fingerprint(cfg, STAGE))
    removed = ledger.recover()
    sel = selection(cfg)
    done, pending = ledger.counts()
    n_todo = sel.selected - done - pending
    if done or pending or removed:
        say(f"[convert] resuming: {done} chunks already done, {pending} waiting for their retry, "
            f"{removed} uncommitted files removed")
    say(f"[convert] engine {c.engine}: {sel.selected} chunks selected ({sel.stats['heldout_chunks']} held out, "
        f"{sel.stats['beyond_max_chunks']} beyond convert.max_chunks), {n_todo} to convert")

    passes: list[dict] = []
    extra: dict[str, Any] = {"engine": c.engine, "prompt_version": db.version_tag, "resumed_done": done,
                             "resumed_pending": pending, "retried_chunks": 0, "engine_restarts": 0}
    resuming = bool(done or pending)
    budget = Budget(c, ledger.markers())
    if (n_todo or pending) and c.engine != "regex" and budget.exhausted():
        raise budget.stop(done)  # before any engine starts
    if c.engine == "regex":
        extra.update(model="regex", model_revision=db.version_tag, device="cpu")
        if n_todo:
            passes.append(regex_pass(cfg, todo_ds(sel, ledger, resuming), n_todo, ledger, spec))
    else:
        service: Any = contextlib.nullcontext()
        if c.engine == "openai":
            from transformllm_ray.convert.openai_engine import endpoint_label

            o = c.openai
            engine: dict[str, Any] = {"kind": "openai", "model": o.model or c.model, "revision": endpoint_label(o.base_url or ""),
                      "prompts": spec, "device": "endpoint"}
            where = (f"to {engine['model']} at {engine['revision']} ({o.num_clients} client(s) x "
                     f"{o.max_concurrency} requests)")
        else:
            from transformllm_ray.convert.vllm_engine import EngineService, app_name, engine_dtype
            from transformllm_ray.models.assets import model_revision, resolve_model

            device = convert_device(cfg, cluster_gpus())
            check_convert_room(cfg, device)
            app = app_name(cfg.stage_dir(STAGE))
            engine = {"kind": "vllm", "model": c.model, "revision": model_revision(c.model, c.model_revision),
                      "prompts": spec, "device": device, "app": app}
            where = f"on {c.vllm.num_engines} {device} engine(s) of {c.model}"
            extra["dtype"] = engine_dtype(c.vllm.dtype, device)  # `auto` as resolved on this machine
            if n_todo or pending:  # one start-up for every pass of this run
                say(f"[convert] starting {c.vllm.num_engines} {device} engine(s) of {c.model} (Ray Serve "
                    f"application {app})")
                service = EngineService(cfg, resolve_model(c.model), device, app)
        extra.update(model=engine["model"], model_revision=engine["revision"], device=engine["device"])
        t_start = time.time()
        with service as running:
            engine["service"] = running
            extra["engine_start_seconds"] = round(time.time() - t_start, 3)
            engine["since"] = t_start  # the first commit's engine time (the cost) includes the start-up
            if n_todo:
                say(f"[convert] pass 1: {n_todo} chunks x {c.tasks_per_chunk} tasks {where}")
                passes.append(_pass(cfg, lambda: (todo_ds(sel, ledger, True), sel.selected - sum(ledger.counts())),
                                    1, ledger, db, engine, budget, extra))
            passes += _retry(cfg, ledger, db, engine, extra, budget)
    final = reconcile(ledger, sel)
    markers = ledger.markers()
    run_out = sum(p["output_tokens"] for p in passes)
    # the passes' wall time plus the one engine start-up before them
    run_secs = sum(p["seconds"] for p in passes) + (extra.get("engine_start_seconds", 0.0) if passes else 0.0)
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
        "seconds_to_first_output": round(passes[0].get("seconds_to_first_output", 0.0) + extra.get(
            "engine_start_seconds", 0.0), 3) if passes else 0.0,
        "prompts_truncated": sum(p.get("prompts_truncated", 0) for p in passes),
        "engine_errors": sum(p.get("engine_errors", 0) for p in passes),
        "commits": len(markers), "rows_per_file": c.rows_per_file, "tasks_per_chunk": c.tasks_per_chunk,
        "sampling": c.sampling.model_dump(), "seconds": round(time.time() - t0, 3),
        # What all committed work cost at convert.cost's prices (every pass, every run).
        "cost": {"total": round(Budget(c, markers).spent, 6), "currency": c.cost.currency,
                 "max_cost": c.max_cost, **c.cost.model_dump(exclude={"currency"}),
                 "engine_hours": round(sum(engine_seconds(m) for m in markers) / 3600, 6)},
    }
    write_card(cfg, stats)  # before stats.json, the completion marker: a finished stage always has its card
    return write_stats(cfg, STAGE, stats)
