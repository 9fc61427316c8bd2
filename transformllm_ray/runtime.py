"""Ray start-up shared by the CLI and the jobs: join a cluster or start a local one, forward env vars.

    with ray_session(cfg):
        run_stage(cfg, "ingest")

`ray.address` (config) or $RAY_ADDRESS -> join that cluster, passing no resource counts (inside `ray job
submit` the job's runtime env, with its env vars, already reaches every worker). Otherwise a new local
single-node Ray of our own, whatever else runs on the machine, with `ray.num_cpus` (and
its dashboard on loopback unless `ray.dashboard=false`), and
the non-secret variables matching `ray.forward_env` (VLLM_*, WANDB_MODE, HF_HUB_OFFLINE, ...) passed to
workers through the runtime env. Secret ones (WANDB_API_KEY, HF_TOKEN, ...) are *not* put in a runtime env:
Ray 2.60's runtime-env agent logs runtime envs, values included, in runtime_env_agent.log. Local workers
inherit them anyway, from the raylet that this process starts. If Ray is already initialised (tests), it is
used as is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re

from transformllm_ray.config import Config

SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "CREDENTIALS")
# A hint counts as a whole `_`-separated word: WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY are secrets;
# TOKENIZERS_PARALLELISM is not.
_SECRET = re.compile(r"(^|_)(" + "|".join(SECRET_HINTS) + r")(_|$)")


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name.upper()))


def forwarded_env(patterns: list[str], environ: dict | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def split_secrets(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret) variables."""
    secret = {k: v for k, v in env.items() if is_secret(k)}
    return {k: v for k, v in env.items() if k not in secret}, secret


def redact(env: dict[str, str]) -> dict[str, str]:
    """For logs: values of secret-looking variables replaced."""
    return {k: ("***" if is_secret(k) else v) for k, v in env.items()}


RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 8 * 1024}
"""Ray settings of the local Ray we start (a cluster's nodes get the same as `RAY_max_direct_call_object_size`
in their environment: cluster/*.yaml). Ray returns a task's result smaller than this limit (default 100 KiB)
inline, into the heap of the process that submitted the task, and Ray Data's driver submits every task: the
narrow blocks of our group-bys (ids and counts, ~100 KB a file) then pass through the driver's heap, and its
peak RSS grew with the rows (convert's exactly-once check over 838k ids: 163 -> 328 MB at 200M tokens, 237
MB at 10M). At 8 KiB such blocks go to the object store and the peak stays flat (247 MB at 200M); control
messages stay inline."""


def alive_nodes() -> int:
    """Nodes of the Ray cluster that can run work (a head started with 0 CPUs and 0 GPUs does not count)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0
                                                             or n.get("Resources", {}).get("GPU", 0) > 0))


def check_storage(cfg: Config, nodes: int) -> None:
    """Refuse local output paths on a cluster of several nodes (unless `ray.shared_storage`): nodes share no
    disk, so each would write its part of a stage where no other node can read it."""
    from transformllm_ray.storage import is_remote
    from transformllm_ray.train.stage import storage_path

    if nodes <= 1 or cfg.ray.shared_storage:
        return
    local = [f"{k}={v}" for k, v in (("output_dir", cfg.output_dir), ("train.storage_path", storage_path(cfg)))
             if not is_remote(v)]
    if local:
        raise ValueError(f"{' and '.join(local)}: a local path, but this Ray cluster has {nodes} nodes and they share "
                         "no disk. Put output_dir and train.storage_path on object storage (s3://bucket/run, "
                         "gs://...; S3-compatible stores through AWS_ENDPOINT_URL), or set ray.shared_storage=true "
                         "if that path is a filesystem mounted on every node (NFS)")


@contextlib.contextmanager
def ray_session(cfg: Config):
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        plain, _secret = split_secrets(forwarded_env(cfg.ray.forward_env))
        # address="local": always a new Ray of our own. Without it, ray.init joins a Ray it finds on the machine
        # (a `ray start --head` someone keeps, or a stale ray_current_cluster file of a crashed one) and then
        # fails on num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard,
                 runtime_env={"env_vars": plain}, _system_config=dict(RAY_SYSTEM_CONFIG))  # a copy: ray.init adds keys to it
    try:
        check_storage(cfg, alive_nodes())
        yield
    finally:
        ray.shutdown()
