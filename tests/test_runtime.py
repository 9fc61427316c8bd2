"""Runtime helpers: which variables count as secrets, and that secrets stay out of runtime envs."""

from __future__ import annotations

import os

import pytest

from transformllm_ray.runtime import forwarded_env, is_secret, redact, split_secrets


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_secret_names_are_whole_words():
    for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "HUGGING_FACE_HUB_TOKEN", "DB_PASSWORD",
                 "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret(name), name
    for name in ("TOKENIZERS_PARALLELISM", "WANDB_MODE", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "KEYBOARD"):
        assert not is_secret(name), name


def test_split_and_redact():
    env = forwarded_env(["WANDB_*", "HF_*"], {"WANDB_API_KEY": "s3cr3t", "WANDB_MODE": "offline", "PATH": "/bin",
                                                 "HF_TOKEN": "hf_x"})
    plain, secret = split_secrets(env)
    assert plain == {"WANDB_MODE": "offline"} and secret == {"WANDB_API_KEY": "s3cr3t", "HF_TOKEN": "hf_x"}
    assert "s3cr3t" not in str(redact(env)) and redact(env)["WANDB_MODE"] == "offline"


STATE_API_PROBE = r"""
import sys
import ray
from ray.util.state import get_actor
from transformllm_ray.config import load_config
from transformllm_ray.runtime import ray_session

with ray_session(load_config(sys.argv[1], sys.argv[2:])):
    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    try:
        # This cluster's address, named: the test session runs a second local Ray, and the State API client
        # refuses to guess between two ("Found multiple active Ray instances").
        address = ray.get_runtime_context().gcs_address
        print("STATE", get_actor(probe._actor_id.hex(), address=address, timeout=10).state)
    except Exception as e:  # the State API's own errors when no dashboard serves it
        print("STATE unavailable", type(e).__name__)
"""


def test_local_ray_serves_the_state_api_that_ray_train_polls(tmp_path):
    """A local Ray from ray_session answers the State API (Ray Train 2.60's placement-group cleaner polls it every
    second and logs a warning each time it cannot); `ray.dashboard=false` turns that off."""
    import os
    import subprocess
    import sys

    from tests.helpers import write_config

    path = write_config(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": ""}

    def probe(*overrides: str) -> str:
        r = subprocess.run([sys.executable, "-c", STATE_API_PROBE, path, "ray.num_cpus=1", *overrides],
                           capture_output=True, text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split("STATE", 1)[1].strip()

    assert probe() == "ALIVE"
    assert probe("ray.dashboard=false").startswith("unavailable")


def test_cluster_nodes_get_the_local_sessions_ray_settings():
    """Every node of every shipped cluster definition starts Ray with RAY_SYSTEM_CONFIG (as environment
    variables), so a cluster driver keeps narrow blocks out of its heap as the local session does."""
    import glob
    import re

    from transformllm_ray.runtime import RAY_SYSTEM_CONFIG

    for path in ["cluster/aws.yaml", "cluster/gcp.yaml", *glob.glob("cluster/kuberay/ray*.yaml")]:
        text = open(path).read()
        starts = text.count("ray start") if "kuberay" not in path else text.count("image: ")
        for key, value in RAY_SYSTEM_CONFIG.items():
            found = re.findall(rf"RAY_{key}(?:=|\"?, value: \"?)(\d+)", text)
            assert len(found) == starts and set(found) == {str(value)}, (path, key, found, starts)


LOCAL_PROBE = r"""
import sys
import ray
from transformllm_ray.config import load_config
from transformllm_ray.runtime import ray_session

with ray_session(load_config(sys.argv[1], sys.argv[2:])):
    print("GCS", ray.get_runtime_context().gcs_address, "CPUS", int(ray.cluster_resources()["CPU"]))
"""


def test_local_mode_is_local_beside_a_running_head_and_a_stale_cluster_file(tmp_path):
    """Without RAY_ADDRESS, ray_session starts its own Ray: not the one a `ray start --head` keeps running on
    the machine, and not the address a crashed Ray left in ray_current_cluster. (RAY_TMPDIR keeps this test's
    cluster file and head apart from the rest of the machine.)"""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    from tests.helpers import write_config

    path = write_config(tmp_path)
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": tmp}
    os.makedirs(f"{tmp}/ray")
    with open(f"{tmp}/ray/ray_current_cluster", "w") as f:  # a stale file: nothing listens there
        f.write("127.0.0.1:9\n")

    def probe() -> tuple[str, int]:
        r = subprocess.run([sys.executable, "-c", LOCAL_PROBE, path, "ray.num_cpus=1", "ray.dashboard=false"],
                           capture_output=True, text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        gcs, cpus = r.stdout.split("GCS", 1)[1].split("CPUS")
        return gcs.strip(), int(cpus)

    assert probe()[1] == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=3",
                             "--include-dashboard=false"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not open(f"{tmp}/ray/ray_current_cluster").read().strip().endswith(f":{port}"):
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(1)
        gcs, cpus = probe()
        assert cpus == 1 and not gcs.endswith(f":{port}"), (gcs, cpus)  # its own Ray, not the head's 3 CPUs
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_local_output_on_several_nodes_is_refused_naming_the_fix(tmp_path):
    from transformllm_ray.config import load_config
    from transformllm_ray.runtime import check_storage

    local = load_config(f"{REPO}/configs/debug-local.yaml", [f"output_dir={tmp_path}/out"])
    check_storage(local, 1)  # one node: its disk is everyone's
    with pytest.raises(ValueError) as e:
        check_storage(local, 3)
    msg = str(e.value)
    assert f"output_dir={tmp_path}/out" in msg and "train.storage_path=" in msg and "3 nodes" in msg
    assert "s3://" in msg and "ray.shared_storage=true" in msg
    check_storage(load_config(f"{REPO}/configs/debug-local.yaml",
                              [f"output_dir={tmp_path}/out", "ray.shared_storage=true"]), 3)
    remote = load_config(f"{REPO}/configs/debug-local.yaml", ["output_dir=s3://b/run"])
    check_storage(remote, 3)  # checkpoints default to <output_dir>/train/checkpoints: remote too
    mixed = load_config(f"{REPO}/configs/debug-local.yaml", ["output_dir=s3://b/run", f"train.storage_path={tmp_path}"])
    with pytest.raises(ValueError, match="train.storage_path=.*a local path"):
        check_storage(mixed, 2)
