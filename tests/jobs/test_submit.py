"""`ray job submit` of the debug pipeline to a real local head; a second submit redoes nothing.

This is the documented cluster path, run on loopback: `ray start --head` (temp dir, stopped afterwards),
`ray job submit --working-dir . --runtime-env-json '{...}' -- python -m jobs.pipeline --config ...` on a small
sample of the embedded default. Secrets travel through the runtime env's env vars (a fake W&B key here, with
W&B offline) and must appear in none of the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B-key-shaped; W&B is offline, nothing is sent
SAMPLE = ["input.max_files=60", "convert.max_chunks=4", "convert.tasks_per_chunk=1",
          "convert.sampling.max_tokens=48", "train.max_steps=4", "train.warmup_steps=1", "train.seq_len=128",
          "train.checkpoint_every=2", "eval.max_sequences=4", "ray.num_cpus=null"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """A real Ray head on loopback, with this virtualenv first on PATH (the job's `python`).

    `ray start --block` in its own process group, stopped by signalling that group: `ray stop --force` would
    also kill the test session's own local Ray (and with it this pytest process, whose driver exits when its
    GCS dies)."""
    import urllib.request

    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": ""}
    for k in ("WANDB_API_KEY", "HF_TOKEN"):
        env.pop(k, None)
    port, dash = _free_port(), _free_port()
    # Every fixed default port moved to a free one: the test session's own local Ray already holds the
    # defaults (52365 for the dashboard agent: with it taken, the job server answers "No available agent").
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    proc = subprocess.Popen([f"{BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports,
                             "--num-cpus=4", f"--temp-dir={tmp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:  # the job server is up once the dashboard answers
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(address: str, env: dict, out: str) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                "TOKENIZERS_PARALLELISM": "false"}}
    cmd = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.pipeline", "--config", "configs/debug-local.yaml", f"output_dir={out}", *SAMPLE]
    for _ in range(30):
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
        # The dashboard answers before its job agent is up (seconds on a loaded 2-core machine); Ray says to
        # retry, and no job was created.
        if "No available agent to submit job" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


def _mtimes(root: str) -> dict:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
            if "/report/" not in os.path.join(d, f) and "/logs/" not in os.path.join(d, f)}


def test_submit_runs_pipeline_then_resubmit_redoes_nothing(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = head
    out = str(tmp_path / "job-out")
    t0 = time.time()
    first = _submit(address, env, out)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-5000:]
    client = JobSubmissionClient(address)
    jobs = client.list_jobs()
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED], log[-3000:]
    for stage in ("ingest", "convert", "pack", "train", "eval", "report"):
        stats = json.load(open(f"{out}/{stage}/stats.json"))
        assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"], stage
    assert json.load(open(f"{out}/convert/stats.json"))["rows_in"] == 4
    assert os.path.isfile(f"{out}/train/model/config.json")
    assert os.path.isfile(f"{out}/report/report.md")
    first_seconds = time.time() - t0

    before = _mtimes(out)
    second = _submit(address, env, out)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-5000:]
    for stage in ("ingest", "convert", "pack", "train", "eval"):
        assert f"[{stage}] already finished: skipping" in log2, stage
    assert _mtimes(out) == before  # nothing rewritten (the report is rebuilt and the log appended, by design)
    assert [j.status for j in client.list_jobs()] == [JobStatus.SUCCEEDED] * 2

    # The secret passed in the runtime env reached no output file.
    for d, _, fs in os.walk(out):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                assert FAKE_KEY.encode() not in fh.read(), os.path.join(d, f)
    print(f"first submit {first_seconds:.0f}s")
