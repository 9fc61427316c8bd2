"""Ray start-up shared by the CLI and the jobs: join a cluster or start a local one, forward env vars.

    with ray_session(cfg):
        run_stage(cfg, "ingest")

`ray.address` (config) or $RAY_ADDRESS -> join that cluster (inside `ray job submit` the job's runtime env,
with its env vars, already reaches every worker). Otherwise a local single-node Ray with `ray.num_cpus`, and
the variables matching `ray.forward_env` (VLLM_*, WANDB_*, HF_*) passed to workers through the runtime env:
that is how secrets travel, never through config files. If Ray is already initialised (tests), it is used
as is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os

from transformllm_ray.config import Config

SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def forwarded_env(patterns: list[str], environ: dict | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def redact(env: dict[str, str]) -> dict[str, str]:
    """For logs: values of secret-looking variables replaced."""
    return {k: ("***" if any(h in k.upper() for h in SECRET_HINTS) else v) for k, v in env.items()}


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
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": forwarded_env(cfg.ray.forward_env)})
    try:
        yield
    finally:
        ray.shutdown()
