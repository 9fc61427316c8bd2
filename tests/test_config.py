"""Config: every shipped file loads; unknown keys, wrong types, missing values are one-line errors."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from transformllm_ray.config import ConfigError, config_from_dict, describe, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_there_are_configs():
    assert any(p.endswith("debug-local.yaml") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and (cfg.input.paths or cfg.input.builtin)


BASE = {"output_dir": "o", "input": {"builtin": "licensedcode"}}


@pytest.mark.parametrize("data, message", [
    ({**BASE, "train": {"lrr": 1e-5}}, "train.lrr: unknown key"),
    ({**BASE, "ingest": {"chunk_tokens": "many"}}, "ingest.chunk_tokens: Input should be a valid integer"),
    ({"input": {"builtin": "licensedcode"}}, "output_dir: required value missing"),
    ({**BASE, "convert": {"engine": "gpt"}}, "convert.engine: Input should be 'vllm', 'regex' or 'openai'"),
    ({**BASE, "train": {"warmup_steps": 100, "max_steps": 10}}, "train.warmup_steps: must be below train.max_steps"),
    ({"output_dir": "o", "input": {}}, "input: set `paths` or `builtin`"),
])
def test_errors_name_the_key_in_one_line(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_and_extends(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("output_dir: o\ninput:\n  builtin: licensedcode\ntrain:\n  lr: 3.0e-4\n  max_steps: 20\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  max_steps: 30\n")
    cfg = load_config(child, ["train.lr=1e-5", "input.paths=[a.jsonl, b.jsonl]", "convert.max_chunks=null"])
    assert cfg.train.lr == 1e-5 and cfg.train.max_steps == 30 and cfg.input.paths == [os.path.abspath("a.jsonl"), os.path.abspath("b.jsonl")]
    assert cfg.convert.max_chunks is None
    with pytest.raises(ConfigError, match="train.max_steps: Input should be a valid integer"):
        load_config(child, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(child, ["train.max_steps"])


def test_yes_and_no_are_strings_true_and_false_booleans(tmp_path):
    """YAML 1.2 booleans: `use_gpu: yes` is the string its field expects (YAML 1.1 made it True, refused)."""
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: o\ninput:\n  builtin: licensedcode\ntrain:\n  use_gpu: yes\nray:\n  dashboard: false\n")
    cfg = load_config(p, ["convert.retry_rejected=false"])
    assert cfg.train.use_gpu == "yes" and cfg.ray.dashboard is False and cfg.convert.retry_rejected is False
    assert load_config(p, ["train.use_gpu=no", "ray.dashboard=true"]).train.use_gpu == "no"
    with pytest.raises(ConfigError, match=r"ray.dashboard: Input should be a valid boolean \(got 'no'\)"):
        load_config(p, ["ray.dashboard=no"])


def test_a_key_set_twice_is_an_error_naming_key_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: o\ninput:\n  builtin: licensedcode\ntrain:\n  lr: 3.0e-4\n  max_steps: 20\n"
                 "  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML: duplicate key 'lr' on line 7 \(first set on line 5\)"):
        load_config(p)
    p.write_text("output_dir: o\ninput:\n  builtin: licensedcode\noutput_dir: p\n")
    with pytest.raises(ConfigError, match="duplicate key 'output_dir' on line 4"):
        load_config(p)
    p.write_text("output_dir: o\ninput:\n  builtin: licensedcode\ntrain:\n  lr: 3.0e-4\neval:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="eval.lr"):  # the same name in two sections is fine; eval has no lr
        load_config(p)


def test_every_field_has_a_docstring():
    rows = describe()
    assert len(rows) > 60
    assert [k for k, _, doc in rows if not doc] == []


def test_cli_reports_config_errors_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: o\ninput:\n  builtin: licensedcode\ningest:\n  chunk_size: 10\n")
    r = subprocess.run([sys.executable, "-m", "transformllm_ray.cli", "ingest", "--config", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "transformllm: config error: ingest.chunk_size: unknown key"
    assert "ray" not in r.stderr.lower().replace("transformllm_ray", "")


def test_cli_stages_are_the_documented_contract():
    from transformllm_ray.cli import COMMANDS

    assert COMMANDS[:7] == ("ingest", "convert", "pack", "train", "eval", "report", "run")


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    """Ray workers run in another working directory: a relative path must not reach them."""
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({
        "output_dir": "out/x", "input": {"paths": ["data/*.jsonl", "s3://b/raw/"]},
        "general": {"paths": ["~/general"]}, "pack": {"domain_paths": ["gs://b/d"]},
        "train": {"storage_path": "ckpt", "resume": "ckpt/run/step-00000010"}})
    assert cfg.output_dir == str(tmp_path / "out/x")
    assert cfg.input.paths == [str(tmp_path / "data/*.jsonl"), "s3://b/raw/"]
    assert cfg.general.paths == [os.path.expanduser("~/general")] and cfg.pack.domain_paths == ["gs://b/d"]
    assert cfg.train.storage_path == str(tmp_path / "ckpt")
    assert cfg.train.resume == str(tmp_path / "ckpt/run/step-00000010")
    assert config_from_dict({"output_dir": "s3://b/o", "input": {"builtin": "licensedcode"}}).output_dir == "s3://b/o"
    assert config_from_dict({"output_dir": "o", "input": {"builtin": "licensedcode"}}).train.resume == "auto"
    (tmp_path / "models" / "m").mkdir(parents=True)
    named = config_from_dict({"output_dir": "o", "input": {"builtin": "licensedcode"},
                              "convert": {"model": "models/m"}, "train": {"base_model": "./base"},
                              "pack": {"tokenizer": "org/hub-model"}})
    assert named.convert.model == str(tmp_path / "models/m")           # an existing local folder
    assert named.train.base_model == str(tmp_path / "base")            # written as a path
    assert named.pack.tokenizer == "org/hub-model"                      # a hub name
    assert config_from_dict({"output_dir": "o", "input": {"builtin": "licensedcode"}}).convert.model.startswith("builtin:")
