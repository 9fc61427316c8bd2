"""Command line: `transformllm <stage> --config PATH [dotted.key=value ...]`.

    transformllm run    --config configs/debug-local.yaml                  # every stage, skipping finished ones
    transformllm run    --config configs/debug-local.yaml train.seq_len=512 --redo   # redo what the change touches
    transformllm ingest --config configs/debug-local.yaml ingest.chunk_tokens=512
    transformllm keys                                                       # every config key with its doc

Stages: ingest, convert, pack, train, eval, report, run; plus `plan` (estimate cost) and `keys`. The config
is loaded and validated before Ray starts: a bad key or value exits with status 2 and one line, and so does
a stage whose recorded inputs differ from the config's (stage.py), unless `--redo` asks to redo it.
`python -m jobs.pipeline --config ...` is the same code path (used by `ray job submit`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from transformllm_ray.config import STAGES, ConfigError, describe, load_config

COMMANDS = (*STAGES, "run", "plan", "keys")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transformllm", description="Raw domain corpus -> domain-adapted LLM, on Ray.")
    p.add_argument("stage", choices=COMMANDS, help="stage to run (run = all stages in order)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--verbose", action="store_true",
                   help="print everything (Ray, Ray Data, vLLM, Ray Train) on the terminal instead of one progress "
                        "line per stage and <output_dir>/logs/driver.log")
    p.add_argument("--redo", action="store_true",
                   help="redo a stage whose output was made from other inputs (deletes that output) instead of "
                        "refusing; with run, every such stage and the stages after it")
    return p


def run_stages(cfg, stages, redo: bool = False, checked: bool = False) -> dict:
    from transformllm_ray.runtime import ray_session
    from transformllm_ray.stage import check_stages, run_stage

    if not checked:
        check_stages(cfg, stages, redo)  # before Ray starts: a refusal costs no start-up
    results = {}
    with ray_session(cfg):
        for s in stages:
            results[s] = run_stage(cfg, s, redo)
    return results


def one_line(e: BaseException) -> str:
    """An error as one line: `Type: first line of its message`; for an error raised in a Ray task or actor
    (whose message is the remote traceback), the remote error's own last line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if hasattr(e, "cause") and type(e).__module__.startswith("ray.") and lines:
        return f"{lines[-1][:500]} (in {lines[0].split(' (pid=')[0]})"
    return f"{type(e).__name__}: {lines[0][:500]}" if lines else type(e).__name__


def main(argv: list[str] | None = None, default_stage: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if default_stage and (not argv or argv[0] not in COMMANDS):
        argv = [default_stage, *argv]
    args = build_parser().parse_intermixed_args(argv)
    if args.stage == "keys":
        for key, default, doc in describe():
            print(f"{key} = {default}\n    {doc}")
        return 0
    if not args.config:
        print("transformllm: error: --config is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"transformllm: config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stage == "plan":
        from transformllm_ray.plan import print_plan

        print_plan(cfg)
        return 0
    from transformllm_ray.console import disable_ray_data_bars, quiet_console, say
    from transformllm_ray.stage import StageChanged, check_stages

    stages = STAGES if args.stage == "run" else (args.stage,)
    try:
        check_stages(cfg, stages, args.redo)  # before Ray starts and before any log: a refusal costs nothing
    except StageChanged as e:
        print(f"transformllm: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:  # an input path that matches nothing, a bad model name
        print(f"transformllm: error: {e}", file=sys.stderr)
        return 2
    with quiet_console(cfg.output_dir, args.verbose) as log_path:
        if log_path:
            say(f"transformllm {args.stage}: {cfg.output_dir} (full log: {log_path})")
        disable_ray_data_bars()
        try:
            run_stages(cfg, stages, args.redo, checked=True)
        except StageChanged as e:  # an upstream stage redone in this run changed what a later one reads
            say(f"transformllm: {e}", err=True)
            return 2
        except Exception as e:
            if not log_path:
                raise
            logging.getLogger("transformllm").exception("failed")  # the traceback, into the log
            say(f"transformllm: failed: {one_line(e)} (traceback and logs: {log_path})", err=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
