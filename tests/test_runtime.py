"""Runtime helpers: which variables count as secrets, and that secrets stay out of runtime envs."""

from __future__ import annotations

from transformllm_ray.runtime import forwarded_env, is_secret, redact, split_secrets


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
