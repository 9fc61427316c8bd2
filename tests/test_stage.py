"""stage.py: fingerprints of what each stage reads, and what a rerun with changed inputs does.

Every config key is flipped one at a time on the embedded default's config; exactly the stages that read it
(table below, written from the code's behaviour, not from `inputs()`) and the stages after them must change
fingerprint. Then a real stage run: a changed key is refused before Ray starts, naming the key; `--redo`
redoes the stage.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import typing

import pytest
import yaml

from tests.helpers import write_config
from transformllm_ray.config import Config, _read_yaml, config_from_dict, describe
from transformllm_ray.stage import stage_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("ingest", "convert", "pack", "train", "eval")
READS = {"ingest": (), "convert": ("ingest",), "pack": ("ingest", "convert"), "train": ("pack",),
         "eval": ("ingest", "train")}

# Who reads each key (directly). Longest matching prefix wins; keys no stage's output depends on map to ().
READERS: dict[str, tuple[str, ...]] = {
    "output_dir": (),                       # where, not what
    "seed": ("convert", "pack", "train"),   # task families, document order, training data order
    "input.": ("ingest",), "input.expected_tokens": (),   # a hint for `plan` only
    "general.": ("ingest",),
    "ingest.": ("ingest",), "ingest.num_actors": (), "ingest.cpus_per_actor": (),
    "ingest.near_dup.docs_per_partition": (),  # how the map-reduce is cut, not its result
    "split.": ("ingest",),
    "convert.": ("convert",),
    "convert.model": ("ingest", "convert"),  # ingest chunks with the converter's tokenizer (ingest.tokenizer unset)
    "convert.rows_per_file": (),             # groups commits; the rows are the same
    "convert.vllm.": ("convert",),
    "convert.openai.": (),                   # where and how fast the endpoint is asked, not what it answers
    "convert.openai.model": ("convert",),    # the served model (with engine openai)
    "convert.cost.": (), "convert.max_cost": (),  # prices and budget: a rerun with a higher budget continues
    **{f"convert.vllm.{k}": () for k in ("num_engines", "batch_size", "gpu_memory_utilization", "cpu_kvcache_gib",
                                         "cpus_per_engine", "max_restarts", "max_concurrent_batches",
                                         "enforce_eager", "env")},
    "pack.": ("pack",), "pack.num_actors": (), "pack.cpus_per_actor": (),
    "pack.tokenizer": ("pack", "eval"),     # eval tokenises the held-out text with it
    "train.": ("train",),
    "train.seq_len": ("pack", "train", "eval"),
    "train.base_model": ("pack", "train", "eval"),  # pack and eval tokenise with it (pack.tokenizer unset)
    **{f"train.{k}": () for k in ("resume", "run_name", "storage_path", "cpus_per_worker", "checkpoint_every",
                                  "keep_checkpoints", "max_failures")},
    "train.wandb.": (),
    "eval.": ("eval",), "eval.batch_size": (),
    # pack rejects the training rows that share n-grams with those eval items
    "eval.decontaminate_paths": ("pack",), "eval.decontaminate_text_field": ("pack",),
    "ray.": (),
}
# Keys read only when another key has some value (the embedded default has it otherwise): flipped on top of it.
CONDITIONAL = {"ingest.tokenizer": {"convert.model": "org/converter"},
               "convert.openai.model": {"convert.engine": "openai", "convert.openai.base_url": "http://h:8000/v1"}}

# Values a flip sets where "the current value changed a little" is not valid or not meaningful.
FLIPS: dict[str, list] = {
    "input.paths": [["extra.jsonl"]], "general.paths": [["extra.jsonl"]], "pack.domain_paths": [["d.parquet"]],
    "input.max_files": [3], "general.max_files": [3], "input.expected_tokens": [10_000],
    "ingest.tokenizer": ["org/tok"], "pack.tokenizer": ["org/tok"], "convert.model_revision": ["abc123"],
    "train.storage_path": ["/tmp/elsewhere"], "train.peak_tflops": [100.0], "train.wandb.entity": ["team"],
    "train.betas": [[0.8, 0.95]], "eval.lm_eval_tasks": [["hellaswag"]], "ray.address": ["auto"],
    "ray.num_cpus": [8], "ray.forward_env": [["X_*"]], "convert.vllm.engine_kwargs": [{"seed": 1}],
    "convert.vllm.env": [{"A": "1"}], "train.resume": ["never"], "convert.max_chunks": [33, None],
    "ingest.near_dup.bands": [40], "ingest.near_dup.rows": [2], "eval.decontaminate_paths": [["extra.jsonl"]],
    "pack.decontaminate.max_matches": [11, None],
    "convert.prompts": ["mine.yaml"], "convert.openai.base_url": ["http://h:8000/v1"],
    "convert.openai.model": ["served"], "convert.openai.requests_per_s": [5.0], "convert.max_cost": [10.0],
}


def readers(key: str) -> tuple[str, ...]:
    best = max((p for p in READERS if key == p or (p.endswith(".") and key.startswith(p))), key=len)
    return READERS[best]


def downstream(stages: typing.Iterable[str]) -> set[str]:
    out = set(stages)
    while True:
        more = {s for s, ups in READS.items() if set(ups) & out} - out
        if not more:
            return out
        out |= more


def _get(d: dict, key: str):
    for k in key.split(".")[:-1]:
        d = d.get(k, {})
    return d.get(key.split(".")[-1], ...)


def _set(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for k in parts[:-1]:
        d = d.setdefault(k, {})
    d[parts[-1]] = value


def candidates(key: str, value):
    if key in FLIPS:
        return FLIPS[key]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 0.5 if value else 0.1, value + 0.1]
    if isinstance(value, str):
        return [value + "x"]
    return []


def literal_options(key: str) -> list:
    model = Config
    for part in key.split("."):
        ann = model.model_fields[part].annotation
        model = ann
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    if args and typing.get_origin(args[0]) is typing.Literal:
        return list(typing.get_args(args[0]))
    return []


def fingerprints(data: dict) -> dict[str, str]:
    cfg = config_from_dict(copy.deepcopy(data))
    return {s: stage_fingerprint(cfg, s) for s in STAGES}


def own_inputs(data: dict) -> dict[str, dict]:
    """Each stage's own declared inputs (without its upstream's): a key its upstream also reads still has to
    be declared by every stage that reads it."""
    import importlib

    cfg = config_from_dict(copy.deepcopy(data))
    return {s: importlib.import_module(f"transformllm_ray.{s}.stage").inputs(cfg) for s in STAGES}


def flipped(base: dict, key: str) -> dict | None:
    """`base` with `key` changed to a valid other value (None if no candidate validates)."""
    current = config_from_dict(copy.deepcopy(base))
    value = _get(current.model_dump(mode="json"), key)
    opts = [o for o in literal_options(key) if o != value] or candidates(key, value)
    for v in opts:
        data = copy.deepcopy(base)
        _set(data, key, v)
        try:
            config_from_dict(copy.deepcopy(data))
        except Exception:
            continue
        return data
    return None


@pytest.fixture
def input_files(tmp_path, monkeypatch):
    """The files the flips name, in the working directory: stages record their input files' sizes, so a
    path must exist to have a fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "extra.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "d.parquet")
    # Prompt databases to flip to: a user's file, and package files for another domain and version.
    import yaml

    from transformllm_ray.convert import prompts

    legal = yaml.safe_load(open(os.path.join(prompts.PROMPTS_DIR, "legal", "v1.yaml")))
    for domain, version in (("legal", "v1"), ("legal", "v1x"), ("legalx", "v1")):
        (tmp_path / "prompts" / domain).mkdir(parents=True, exist_ok=True)
        (tmp_path / "prompts" / domain / f"{version}.yaml").write_text(
            yaml.safe_dump({**legal, "domain": domain, "version": version}))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**legal, "domain": "mine"}))
    monkeypatch.setattr(prompts, "PROMPTS_DIR", str(tmp_path / "prompts"))
    return tmp_path


@pytest.mark.parametrize("config", ["configs/debug-local.yaml", "configs/phi2-legal.yaml"])
def test_each_key_changes_exactly_the_stages_that_read_it(config, input_files):
    base = _read_yaml(__import__("pathlib").Path(REPO) / config)
    for src in ("input", "general"):  # the presets' s3://YOUR-BUCKET/... cannot be listed here
        if base.get(src, {}).get("paths"):
            _set(base, f"{src}.paths", ["a.jsonl"])
    keys = [k for k, _, _ in describe()]
    assert len(keys) > 90
    untested, wrong = [], []
    for key in keys:
        start = copy.deepcopy(base)
        for k, v in CONDITIONAL.get(key, {}).items():
            _set(start, k, v)
        before, own_before = fingerprints(start), own_inputs(start)
        data = flipped(start, key)
        if data is None:
            untested.append(key)
            continue
        after, own_after = fingerprints(data), own_inputs(data)
        changed = {s for s in STAGES if before[s] != after[s]}
        want = downstream(readers(key))
        if key == "pack.domain_paths":  # pack then reads those files instead of convert's output
            want = downstream(("pack",))
        if changed != want:
            wrong.append(f"{key}: changed {sorted(changed)}, expected {sorted(want)}")
        own = {s for s in STAGES if own_before[s] != own_after[s]}
        if own != set(readers(key)):
            wrong.append(f"{key}: in the own inputs of {sorted(own)}, read by {sorted(readers(key))}")
    assert not untested, f"no valid flip for {untested}: add one to FLIPS"
    assert not wrong, "\n".join(wrong)


def test_regex_engine_reads_no_model_decoding_or_gate():
    base = _read_yaml(__import__("pathlib").Path(REPO) / "configs/debug-local.yaml")
    _set(base, "convert.engine", "regex")
    before = fingerprints(base)
    for key in ("convert.sampling.temperature", "convert.retry_sampling.top_p", "convert.quality.min_chars",
                "convert.vllm.max_model_len", "convert.retry_rejected", "convert.model_revision"):
        assert fingerprints(flipped(base, key))["convert"] == before["convert"], key
    assert fingerprints(flipped(base, "convert.tasks_per_chunk"))["convert"] != before["convert"]


def test_changed_input_is_refused_naming_the_key_and_redo_redoes(ray_local, tmp_path):
    from transformllm_ray.config import load_config
    from transformllm_ray.stage import StageChanged, run_stage

    path = write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 12}, ingest={"chunk_tokens": 256})
    first = run_stage(load_config(path), "ingest")
    assert first["inputs"]["ingest.chunk_tokens"] == 256 and "ingest.num_actors" not in first["inputs"]
    # a key ingest does not read: still finished
    assert run_stage(load_config(path, ["ingest.num_actors=1"]), "ingest") == first
    with pytest.raises(StageChanged, match=r"ingest.chunk_tokens: 256 -> 128.*--redo"):
        run_stage(load_config(path, ["ingest.chunk_tokens=128"]), "ingest")
    # a stage that reads ingest refuses to build on its stale output
    with pytest.raises(StageChanged, match=r"ingest's output was made from other inputs \(ingest.chunk_tokens"):
        run_stage(load_config(path, ["ingest.chunk_tokens=128", "convert.engine=regex"]), "convert")
    redone = run_stage(load_config(path, ["ingest.chunk_tokens=128"]), "ingest", redo=True)
    assert redone["inputs"]["ingest.chunk_tokens"] == 128 and redone["chunks_out"] > first["chunks_out"]


def test_cli_refuses_before_ray_starts(tmp_path):
    """The CLI checks every recorded stage before starting Ray: exit 2, one message naming the key."""
    from transformllm_ray.config import load_config
    from transformllm_ray.stage import begin

    path = write_config(tmp_path, input={"builtin": "licensedcode"}, ingest={"chunk_tokens": 256})
    begin(load_config(path), "ingest")  # a started (killed) ingest run, as its first act records
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # a Ray start would fail loudly, not refuse
    r = subprocess.run([sys.executable, "-m", "transformllm_ray.cli", "run", "--config", path,
                        "ingest.chunk_tokens=300"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ingest: " in r.stderr and "holds a started run made from other inputs (ingest.chunk_tokens: 256 -> 300)" \
        in r.stderr and "--redo" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert yaml.safe_load  # (yaml used by write_config)


def test_train_checkpoints_outside_output_dir_carry_their_inputs(tmp_path):
    """Checkpoints under a shared storage_path/run_name: a train run in another output_dir with other training
    inputs is refused instead of resuming them; --redo's clear removes that run's checkpoints only."""
    from transformllm_ray.config import load_config
    from transformllm_ray.stage import begin, check, clear

    ck = tmp_path / "ckpt"
    a = load_config(write_config(tmp_path / "a", train={"storage_path": str(ck), "run_name": "r1"}))
    begin(a, "train")
    assert (ck / "r1" / "_inputs.json").exists()
    b = load_config(write_config(tmp_path / "b", train={"storage_path": str(ck), "run_name": "r1", "lr": 0.5}))
    state, changed = check(b, "train")
    assert state == "started" and changed == ["train.lr: 1e-05 -> 0.5"]
    other = load_config(write_config(tmp_path / "c", train={"storage_path": str(ck), "run_name": "r2"}))
    begin(other, "train")
    clear(b, "train")
    assert not (ck / "r1").exists() and (ck / "r2" / "_inputs.json").exists()


def test_outputs_recorded_before_inputs_were_declared_are_refused(tmp_path):
    """stats.json of the previous version (a hash of whole config sections, no `inputs`) cannot vouch for the
    values a stage reads from other sections (pack: train.seq_len): refused, --redo named."""
    import json

    from transformllm_ray.config import load_config
    from transformllm_ray.stage import StageChanged, check, refusal

    cfg = load_config(write_config(tmp_path))
    os.makedirs(cfg.stage_dir("pack"))
    with open(f"{cfg.stage_dir('pack')}/stats.json", "w") as f:
        json.dump({"stage": "pack", "fingerprint": "15682e29e2dd0dc6"}, f)
    state, changed = check(cfg, "pack")
    assert state == "finished" and changed[0].startswith("(inputs not recorded")
    assert "--redo" in refusal(cfg, "pack", state, changed) and StageChanged
