"""Stage bookkeeping shared by every stage: where it writes, whether it is finished, what it was made from.

A stage is finished when `<output_dir>/<stage>/stats.json` exists; it is written last, atomically, so it is
also the stage's completion marker.

What a stage reads is declared next to its code: `inputs(cfg)` in each `<stage>/stage.py` returns the resolved
values its output depends on, as dotted keys (its config fields, the tokenizer it resolves, `train.seq_len`
where it packs, the top-level `seed`...), without the settings that change how fast it runs but not what it
writes (actors, CPUs, batch sizes, `ray.*`). A stage's *inputs* are its own plus those of the stages it reads
(`upstream`); its fingerprint is their hash. A stage records its inputs in `_inputs.json` when it starts and in
stats.json when it finishes. A rerun whose inputs equal the recorded ones skips a finished stage or resumes a
started one; any difference is refused before Ray starts, naming each changed key, old and new value. With
`--redo`, a changed stage's output is deleted and the stage run again; its downstream stages then differ too
(their inputs include this stage's) and are redone in turn by `transformllm run --redo`.

    python -m transformllm_ray.cli ingest --config configs/debug-local.yaml   # runs, skips or resumes
    python -m transformllm_ray.cli run --config configs/debug-local.yaml train.seq_len=512 --redo
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from typing import Any, Callable, Iterable

from transformllm_ray.config import STAGES, Config
from transformllm_ray.console import say
from transformllm_ray.storage import exists, read_json, remove_tree, write_json_atomic

log = logging.getLogger("transformllm")

_RUNNERS = {s: f"transformllm_ray.{s}.stage:run" for s in STAGES}
_MEMO: dict[str, Any] = {}


def remembered(key: str, compute: Callable[[], Any]) -> Any:
    """A value an `inputs()` derives at some cost (a listing of input files), computed once per check: the
    inputs of every stage include their upstream's, so one check asks for it several times. check_stages and
    run_stage start afresh, so files added between two calls in one process are seen."""
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]
INPUTS_FILE = "_inputs.json"


class StageChanged(RuntimeError):
    """A stage's recorded output was made from other inputs than the config gives now, or a stage it reads
    has not finished: the command cannot go on, and says what to run."""


def upstream(cfg: Config, stage: str) -> tuple[str, ...]:
    """The stages whose output `stage` reads."""
    p = cfg.pack
    pack: tuple[str, ...] = ("ingest", "convert")
    if p.domain_paths:  # its domain text from those files; ingest's chunks only for general text or raw chunks
        pack = ("ingest",) if p.mix_ratio > 0 or p.include_raw_chunks else ()
    return {"ingest": (), "convert": ("ingest",), "pack": pack,
            "train": ("pack",), "eval": ("ingest", "train"), "report": ()}[stage]


def section(obj: Any, prefix: str, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A config section's fields as flat dotted keys (nested sections flattened), minus `exclude` (names
    relative to the section, dotted for nested ones)."""
    out: dict[str, Any] = {}
    skip = set(exclude)
    for name, value in obj.model_dump(mode="json").items():
        if name in skip:
            continue
        if isinstance(value, dict) and hasattr(getattr(obj, name), "model_dump"):
            inner = {e.split(".", 1)[1] for e in skip if e.startswith(name + ".")}
            out.update(section(getattr(obj, name), f"{prefix}.{name}", inner))
        else:
            out[f"{prefix}.{name}"] = value
    return out


def stage_inputs(cfg: Config, stage: str) -> dict[str, Any]:
    """Everything the output of `stage` depends on: its own inputs and, transitively, its upstream stages'."""
    if stage == "report":
        return {}
    out: dict[str, Any] = {}
    for up in upstream(cfg, stage):
        out.update(stage_inputs(cfg, up))
    out.update(importlib.import_module(f"transformllm_ray.{stage}.stage").inputs(cfg))
    return dict(sorted(out.items()))


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16] if inputs else ""


def stage_fingerprint(cfg: Config, stage: str) -> str:
    return fingerprint_of(stage_inputs(cfg, stage))


def stats_uri(cfg: Config, stage: str) -> str:
    return f"{cfg.stage_dir(stage)}/stats.json"


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key that differs (a key missing on one side shows as <unset>)."""
    def show(d: dict, k: str) -> str:
        return json.dumps(d[k]) if k in d else "<unset>"

    keys = sorted(set(old) | set(new))
    return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys if old.get(k, ...) != new.get(k, ...)]


def records(cfg: Config, stage: str) -> list[str]:
    """Where a started stage records its inputs: its folder, and for train also the run's checkpoint folder
    (storage_path/run_name may lie outside output_dir, and train resumes from whatever it finds there)."""
    out = [f"{cfg.stage_dir(stage)}/{INPUTS_FILE}"]
    if stage == "train":
        out.append(f"{_checkpoint_run(cfg)}/{INPUTS_FILE}")
    return out


def _checkpoint_run(cfg: Config) -> str:
    from transformllm_ray.train.stage import storage_path

    return f"{storage_path(cfg).rstrip('/')}/{cfg.train.run_name}"


def recorded(cfg: Config, stage: str) -> tuple[str, dict | None]:
    """('finished', stats) | ('started', inputs record) | ('new', None)."""
    uri = stats_uri(cfg, stage)
    if exists(uri):
        return "finished", read_json(uri)
    for marker in records(cfg, stage):
        if exists(marker):
            return "started", read_json(marker)
    return "new", None


def check(cfg: Config, stage: str) -> tuple[str, list[str]]:
    """(state, changed keys): state is new, started or finished; changed lists `key: old -> new` lines, empty
    when the recorded inputs are the config's (or nothing is recorded yet)."""
    if stage == "report":
        return "new", []
    state, rec = recorded(cfg, stage)
    if rec is None:
        return state, []
    want = stage_inputs(cfg, stage)
    if rec.get("fingerprint") == fingerprint_of(want):
        return state, []
    old = rec.get("inputs")
    if old is None:  # recorded by a version that hashed whole config sections: it cannot show which values
        # the stage read from other sections (train.seq_len for pack, seed for convert...), so it cannot vouch
        return state, [f"(inputs not recorded by the version that made it) fingerprint {rec.get('fingerprint')}"]
    return state, changes(old, want)


def refusal(cfg: Config, stage: str, state: str, changed: list[str]) -> str:
    shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
    where = cfg.stage_dir(stage) + (f" (checkpoints {_checkpoint_run(cfg)})" if stage == "train" else "")
    return (f"{stage}: {where} holds a {state} run made from other inputs ({shown}). Rerun with --redo to "
            f"delete it and redo {stage} (`transformllm run --redo` also redoes the stages after it), restore "
            "the old values, or use another output_dir" + (" and train.run_name" if stage == "train" else ""))


def check_stages(cfg: Config, stages: Iterable[str], redo: bool = False) -> None:
    """Before Ray starts: refuse (StageChanged) the first stage whose recorded inputs differ, unless redo, and
    a stage whose upstream (not run in the same command) is stale or unfinished."""
    stages = list(stages)
    _MEMO.clear()
    for s in stages:
        stage_inputs(cfg, s)  # resolves them: an input path that matches nothing fails here, not after start-up
        for up in upstream(cfg, s):
            if up not in stages:
                upstream_stats(cfg, up)
        if not redo:
            state, changed = check(cfg, s)
            if changed:
                raise StageChanged(refusal(cfg, s, state, changed))


def clear(cfg: Config, stage: str) -> None:
    """Delete a stage's output (for --redo); train's checkpoints too, so that it cannot resume from them."""
    remove_tree(cfg.stage_dir(stage))
    if stage == "train":  # run_name is validated non-empty and without '/': never the whole storage_path
        remove_tree(_checkpoint_run(cfg))


def upstream_stats(cfg: Config, stage: str) -> dict:
    """The stats of a stage another one reads: it must be finished, from the inputs the config gives now
    (else the reader would build on stale output)."""
    state, changed = check(cfg, stage)
    if state != "finished":
        raise StageChanged(f"{stage} has not finished (no {stats_uri(cfg, stage)}): run `transformllm {stage}` "
                           "first, or `transformllm run`")
    if changed:
        raise StageChanged(f"{stage}'s output was made from other inputs ({'; '.join(changed[:8])}): the stages "
                           f"after it would read stale data. Run `transformllm run --redo` (or `transformllm "
                           f"{stage} --redo` first), restore the old values, or use another output_dir")
    return read_json(stats_uri(cfg, stage))


def begin(cfg: Config, stage: str) -> None:
    """Record the inputs of a stage that starts (kept by a resumed run, whose inputs are the same)."""
    inputs = stage_inputs(cfg, stage)
    for uri in records(cfg, stage):
        if not exists(uri):
            write_json_atomic(uri, {"stage": stage, "fingerprint": fingerprint_of(inputs), "inputs": inputs})


def write_stats(cfg: Config, stage: str, stats: dict[str, Any]) -> dict:
    """Write stats.json (the completion marker). Checks the reconciliation every stage promises."""
    for k in ("rows_in", "rows_out", "rows_rejected", "seconds"):
        if k not in stats:
            raise KeyError(f"{stage} stats lack {k!r}")
    if stats["rows_in"] != stats["rows_out"] + stats["rows_rejected"]:
        raise AssertionError(f"{stage}: rows_in {stats['rows_in']} != rows_out {stats['rows_out']} + "
                             f"rows_rejected {stats['rows_rejected']}")
    inputs = stage_inputs(cfg, stage)
    stats = {"stage": stage, "fingerprint": fingerprint_of(inputs), **stats, "inputs": inputs}
    write_json_atomic(stats_uri(cfg, stage), stats)
    return stats


def summary_line(stats: dict) -> str:
    extra = "".join(f" {k}={stats[k]}" for k in ("chunks_out", "tokens_out", "steps", "final_loss") if k in stats)
    return (f"[{stats['stage']}] rows_in={stats['rows_in']} rows_out={stats['rows_out']} "
            f"rows_rejected={stats['rows_rejected']}{extra} seconds={stats['seconds']:.1f}")


def runner(stage: str) -> Callable[[Config], dict]:
    mod, fn = _RUNNERS[stage].split(":")
    return getattr(importlib.import_module(mod), fn)


def run_stage(cfg: Config, stage: str, redo: bool = False) -> dict:
    """Run one stage: skip it if finished with the same inputs, resume it if started with them; refuse other
    inputs (StageChanged), or with `redo` delete its output and run it afresh. Returns its stats."""
    _MEMO.clear()
    if stage != "report":
        for up in upstream(cfg, stage):  # first: a refusal must not follow a --redo's deletion
            upstream_stats(cfg, up)
        state, changed = check(cfg, stage)
        if changed and not redo:
            raise StageChanged(refusal(cfg, stage, state, changed))
        if changed:
            say(f"[{stage}] inputs changed ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): "
                f"--redo deletes the {state} output and redoes it")
            clear(cfg, stage)
        elif state == "finished":
            say(f"[{stage}] already finished: skipping ({stats_uri(cfg, stage)})")
            return read_json(stats_uri(cfg, stage))
        begin(cfg, stage)
    t0 = time.time()
    stats = runner(stage)(cfg)
    say(summary_line(stats))
    log.info("%s took %.1fs", stage, time.time() - t0)
    return stats
