"""Stage bookkeeping shared by every stage: where it writes, whether it is finished, its stats.json.

A stage is finished when `<output_dir>/<stage>/stats.json` exists; it is written last, atomically, so it is
also the stage's completion marker. It records the fingerprint of the config sections the stage depends on;
a rerun with the same config skips the stage, a rerun with a changed config is refused with a clear message
(silently mixing outputs of two configs is the worse failure).

    python -m transformllm_ray.cli ingest --config configs/debug-local.yaml   # runs, or skips if finished
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Callable

from transformllm_ray.config import STAGES, Config
from transformllm_ray.storage import exists, read_json, write_json_atomic

log = logging.getLogger("transformllm")

# Config sections each stage's output depends on (its fingerprint).
DEPENDS = {
    "ingest": ("input", "general", "ingest", "split"),
    "convert": ("input", "general", "ingest", "split", "convert"),
    "pack": ("input", "general", "ingest", "split", "convert", "pack"),
    "train": ("input", "general", "ingest", "split", "convert", "pack", "train"),
    "eval": ("input", "general", "ingest", "split", "convert", "pack", "train", "eval"),
    "report": (),
}
_RUNNERS = {s: f"transformllm_ray.{s}.stage:run" for s in STAGES}


class StageChanged(RuntimeError):
    """A finished stage's output was made with another config."""


def stats_uri(cfg: Config, stage: str) -> str:
    return f"{cfg.stage_dir(stage)}/stats.json"


def stage_fingerprint(cfg: Config, stage: str) -> str:
    return cfg.fingerprint(*DEPENDS[stage]) if DEPENDS[stage] else ""


def finished(cfg: Config, stage: str) -> dict | None:
    """The stats of a finished stage, None if not finished; StageChanged if finished with another config."""
    uri = stats_uri(cfg, stage)
    if not exists(uri):
        return None
    stats = read_json(uri)
    want = stage_fingerprint(cfg, stage)
    if want and stats.get("fingerprint") != want:
        raise StageChanged(
            f"{stage}: {cfg.stage_dir(stage)} was produced with a different config (fingerprint "
            f"{stats.get('fingerprint')} != {want}); use another output_dir, or delete that folder to redo it")
    return stats


def write_stats(cfg: Config, stage: str, stats: dict[str, Any]) -> dict:
    """Write stats.json (the completion marker). Checks the reconciliation every stage promises."""
    for k in ("rows_in", "rows_out", "rows_rejected", "seconds"):
        if k not in stats:
            raise KeyError(f"{stage} stats lack {k!r}")
    if stats["rows_in"] != stats["rows_out"] + stats["rows_rejected"]:
        raise AssertionError(f"{stage}: rows_in {stats['rows_in']} != rows_out {stats['rows_out']} + "
                             f"rows_rejected {stats['rows_rejected']}")
    stats = {"stage": stage, "fingerprint": stage_fingerprint(cfg, stage), **stats}
    write_json_atomic(stats_uri(cfg, stage), stats)
    return stats


def summary_line(stats: dict) -> str:
    extra = "".join(f" {k}={stats[k]}" for k in ("chunks_out", "tokens_out", "steps", "final_loss") if k in stats)
    return (f"[{stats['stage']}] rows_in={stats['rows_in']} rows_out={stats['rows_out']} "
            f"rows_rejected={stats['rows_rejected']}{extra} seconds={stats['seconds']:.1f}")


def runner(stage: str) -> Callable[[Config], dict]:
    mod, fn = _RUNNERS[stage].split(":")
    return getattr(importlib.import_module(mod), fn)


def run_stage(cfg: Config, stage: str) -> dict:
    """Run one stage unless finished; returns its stats."""
    if stage != "report":
        done = finished(cfg, stage)
        if done is not None:
            print(f"[{stage}] already finished: skipping ({stats_uri(cfg, stage)})", flush=True)
            return done
    t0 = time.time()
    stats = runner(stage)(cfg)
    print(summary_line(stats), flush=True)
    log.info("%s took %.1fs", stage, time.time() - t0)
    return stats
