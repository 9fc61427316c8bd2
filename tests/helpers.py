"""Small helpers for tests (importable as tests.helpers)."""

from __future__ import annotations


def write_config(tmp_path, **sections) -> str:
    """A YAML config file under tmp_path: output_dir there, sections merged over a minimal base."""
    import yaml

    data = {"output_dir": str(tmp_path / "out"), "input": {"builtin": "licensedcode"}}
    for k, v in sections.items():
        data[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_cli_and_kill(args: list[str], ready, timeout: float = 300, extra_delay: float = 0.0) -> None:
    """Run `python -m transformllm_ray.cli *args` in its own process group (its own local Ray), wait until
    `ready()` is true, `extra_delay` seconds more, then kill -9 the whole group: a real crash of the driver,
    its Ray and its actors. Fails if the run ends before it could be killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transformllm_ray.cli", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        lines = proc.stdout.read().decode(errors="replace").splitlines()
        errors = [ln for ln in lines if "Error" in ln or "Traceback" in ln or ln.startswith("[")][-20:]
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed: "
                             + "\n".join(errors + lines[-10:]))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
