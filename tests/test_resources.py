"""Devices and resource asks (transformllm_ray/resources.py): the rules, and that stages ask through it only.

    .venv/bin/python -m pytest tests/test_resources.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from transformllm_ray.config import load_config
from transformllm_ray.resources import (
    REGEX_ACTOR_CPUS, SMALL_STAGE_CPUS, Pool, asks, convert_device, describe, train_gpu,
)

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs/debug-local.yaml"


@pytest.mark.parametrize("setting,gpus,want", [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 8, "cpu"),
                                               ("cuda", 0, "cuda")])
def test_convert_device(setting, gpus, want):
    assert convert_device(load_config(DEBUG, [f"convert.vllm.device={setting}"]), gpus) == want


@pytest.mark.parametrize("setting,gpus,want", [("auto", 0, False), ("auto", 1, True), ("yes", 0, True),
                                               ("no", 4, False)])
def test_train_gpu(setting, gpus, want):
    assert train_gpu(load_config(DEBUG, [f"train.use_gpu={setting}"]), gpus) is want


def test_asks_follow_the_config():
    cfg = load_config(DEBUG, ["ingest.num_actors=3", "ingest.cpus_per_actor=0.25", "convert.engine=vllm",
                              "convert.vllm.num_engines=2", "convert.vllm.cpus_per_engine=1.5",
                              "convert.vllm.device=auto", "train.num_workers=2", "train.cpus_per_worker=0.5",
                              "train.use_gpu=auto"])
    cpu = asks(cfg, gpus=0)
    assert cpu["ingest"] == [{"CPU": 0.25}] * 3
    # engines, prompt, gate, and one engine client per engine
    assert cpu["convert"] == [{"CPU": 1.5}] * 2 + [{"CPU": SMALL_STAGE_CPUS}] * 4
    assert cpu["train"] == [{"CPU": 0.5}] * 2
    assert cpu["eval"] == [{"CPU": 0.5}]
    gpu = asks(cfg, gpus=4)
    assert gpu["convert"][:2] == [{"CPU": 1, "GPU": 1}] * 2
    assert gpu["train"] == [{"CPU": 0.5, "GPU": 1}] * 2 and gpu["eval"] == [{"CPU": 1, "GPU": 1}]
    regex = asks(load_config(DEBUG, ["convert.engine=regex"]), gpus=0)
    assert regex["convert"] == [{"CPU": REGEX_ACTOR_CPUS}]
    assert "train" not in asks(load_config(DEBUG, ["train.num_workers=0"]), gpus=0)
    assert describe(cfg, 0)[0] == "ingest: 3 x {CPU: 0.25}"


def test_pool_caps_at_available_work():
    import ray.data

    kw = Pool(4, 4, 0.5).actor_pool(available=2)
    assert kw["num_cpus"] == 0.5 and isinstance(kw["compute"], ray.data.ActorPoolStrategy)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (2, 2)
    kw = Pool(1, 3, 0.1, 1).actor_pool()
    assert (kw["compute"].min_size, kw["compute"].max_size, kw["num_gpus"]) == (1, 3, 1)


def test_stages_ask_through_resources_only():
    """A literal CPU/GPU count or actor-pool size in a stage module is an ask the plan and the capacity test
    cannot see."""
    pattern = re.compile(r"num_[cg]pus=\d|ActorPoolStrategy\(|resources_per_worker=\{|\"bundles\": \[\{")
    found = []
    for path in sorted((REPO / "transformllm_ray").rglob("*.py")):
        if path.name == "resources.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "asks outside resources.py:\n" + "\n".join(found)
