"""W&B mode resolution: the config's `auto` follows W&B's own switch, then the presence of a key."""

from __future__ import annotations

from transformllm_ray.config import config_from_dict
from transformllm_ray.train.metrics import wandb_mode


def test_auto_mode_follows_wandb_mode_then_the_key():
    cfg = config_from_dict({"output_dir": "/tmp/o", "input": {"builtin": "licensedcode"}})
    assert wandb_mode(cfg, {}) == "offline"
    assert wandb_mode(cfg, {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode(cfg, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(cfg, {"WANDB_MODE": "disabled"}) == "disabled"
    fixed = config_from_dict({"output_dir": "/tmp/o", "input": {"builtin": "licensedcode"},
                              "train": {"wandb": {"mode": "offline"}}})
    assert wandb_mode(fixed, {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}) == "offline"  # config says so
