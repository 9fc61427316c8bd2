"""`import transformllm_ray` (and the config + CLI modules) must not import torch, vllm or transformers."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "vllm", "transformers")


def test_top_level_import_is_light():
    code = ("import sys, transformllm_ray, transformllm_ray.config, transformllm_ray.cli, transformllm_ray.stage, "
            "transformllm_ray.ingest.stage, transformllm_ray.storage; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_check_can_fail():
    code = "import sys, transformllm_ray.models.tiny as t; import torch; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True"
