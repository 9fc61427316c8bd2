"""Static checks in `make test`: ruff (errors, undefined and unused names, likely bugs) on the whole repo,
and mypy on the package and jobs (an imported name that does not exist, wrong types). Settings in
pyproject.toml. Both must be clean."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    r = _run("ruff", "check", "--output-format", "concise", "transformllm_ray", "jobs", "benchmarks", "tests")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_is_clean():
    r = _run("mypy", "--no-incremental")
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
