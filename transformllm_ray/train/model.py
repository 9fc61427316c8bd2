"""The model side of training: build on the meta device, load base weights into the shards, export to HF.

    folder = base_model_folder("builtin:smollm2-135m-instruct")
    model = build_meta_model(folder)                 # no memory: every tensor on `meta`
    model = parallelize(model, mesh, cfg.train)      # (parallelize.py) FSDP2 shards, still on meta
    materialize(model, device)                       # to_empty + recompute non-persistent buffers (RoPE)
    load_base_weights(model, folder)                 # rank 0 reads safetensors, broadcasts into the shards
    ...
    export_hf(model, folder, dest, tokenizer=...)    # rank 0 gathers a full CPU state dict, save_pretrained

Why meta + broadcast: building the model for real on every rank costs each rank the full model in memory
(7B in fp32 = 28 GB) before sharding; on meta nothing is allocated until `to_empty` allocates only the local
shard, and only rank 0 ever holds the full weights (read from safetensors, broadcast tensor by tensor).

Tied embeddings (SmolLM2 and the tiny test model tie `lm_head.weight` to `embed_tokens.weight`): the tie is
one Parameter object, built by `from_config` on meta; both names sit in the root FSDP group (parallelize.py),
so it stays one sharded parameter, is loaded once (safetensors holds only the embedding) and exported once
(save_pretrained drops the tied copy). `check_tied` asserts the tie survived sharding.

Training params are fp32 (the optimizer's master copy); bf16 is applied by FSDP's mixed-precision policy on
GPU. The export is written in the base model's dtype (bf16 for SmolLM2), as the base folder was.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from typing import Any

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py")
"""Files fetched for a hub name: config, weights, tokenizer (no .bin / .gguf / .pt)."""


def base_model_folder(name: str) -> str:
    """Local folder of the initial weights: builtin:* built once, a local folder as is, a hub name from the
    Hugging Face cache (downloaded where a hub is reachable; HF_HUB_OFFLINE=1 uses the cache only)."""
    from transformllm_ray.models.assets import resolve_model

    path = resolve_model(name)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=list(WEIGHT_PATTERNS))


def read_model_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def build_meta_model(folder: str):
    """The model of `folder`'s config with every parameter and buffer on the meta device, fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.use_cache = False  # training: no KV cache
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def decoder_blocks(model):
    """The ModuleList of transformer blocks: the FSDP and activation-checkpointing unit.

    Found by shape, not by name, so any HF decoder works: the ModuleList whose length is the config's
    num_hidden_layers (Llama/Mistral/Qwen: model.model.layers; Phi: model.model.layers; GPT-2: transformer.h).
    """
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} "
                     f"(no ModuleList of num_hidden_layers={n} modules)")


def materialize(model, device) -> None:
    """Allocate the (sharded) parameters on `device`, recompute non-persistent buffers, keep ties.

    `to_empty` leaves every tensor uninitialised, buffers included. Parameters are overwritten by the base
    weights or a checkpoint next; non-persistent buffers (RoPE `inv_freq`) are in neither, so they are
    recomputed by transformers' own initialiser for the modules that own buffers (parameters of those
    modules are reloaded afterwards anyway).
    """
    import torch

    model.to_empty(device=device)
    owners = [m for m in model.modules() if any(True for _ in m.buffers(recurse=False))]
    with torch.no_grad():
        for m in owners:
            model._init_weights(m)
    # An unsharded model: to_empty gives each module its own new Parameter (meta -> device cannot be swapped
    # in place), which unties a tie; sharded, FSDP2 owns the one parameter and the tie survives.
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out is not None and out.weight is not emb.weight:
        model.tie_weights()


def check_tied(model) -> None:
    """Raise if the input and output embeddings should be tied but are two parameters (a silent 2x bug)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and out.weight is not emb.weight:
        raise AssertionError("tie_word_embeddings is set but lm_head.weight is not embed_tokens.weight")


def read_safetensors(folder: str, dtype) -> dict:
    """Full state dict of every *.safetensors file in `folder`, cast to `dtype` (CPU)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (train.base_model must be a safetensors "
                                "folder or hub name)")
    out: dict[str, Any] = {}
    for fn in files:
        for k, v in load_file(fn, device="cpu").items():
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def load_base_weights(model, folder: str) -> None:
    """Copy `folder`'s safetensors weights into the model (sharded or not).

    Distributed: rank 0 reads the files; `set_model_state_dict(full_state_dict, broadcast_from_rank0)`
    broadcasts each tensor and every rank keeps its own shard. Keys the files lack (the tied lm_head) must be
    tied parameters; any other missing or unexpected key is an error naming the keys.
    """
    import torch
    import torch.distributed as dist

    dtype = next(model.parameters()).dtype
    distributed = dist.is_available() and dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    sd = read_safetensors(folder, dtype) if rank0 else {}
    if rank0:
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names = {n.replace("_checkpoint_wrapped_module.", "") for n in names}
        unique = {n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters()}
        missing = sorted(unique - set(sd))
        unexpected = sorted(set(sd) - names)
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for k in list(sd):  # drop tied duplicates: the tie is one parameter, loaded through its first name
            if k not in unique:
                del sd[k]
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
    else:
        with torch.no_grad():
            res = model.load_state_dict(sd, strict=False)
        bad = [k for k in res.missing_keys if k.replace("_checkpoint_wrapped_module.", "") in unique]
        if bad or res.unexpected_keys:
            raise ValueError(f"{folder}: load failed: missing {bad[:5]}, unexpected {res.unexpected_keys[:5]}")
    check_tied(model)


def count_params(model) -> int:
    """Parameters of the full model (a sharded DTensor's numel is its global size); a tie counts once."""
    return sum(p.numel() for p in model.parameters())


def full_state_dict(model) -> dict:
    """Collective: the full, unsharded state dict on CPU, on rank 0 only ({} elsewhere)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.replace("_checkpoint_wrapped_module.", ""): v.detach().cpu() for k, v in model.state_dict().items()}


def export_dtype(folder: str):
    import torch

    cfg = read_model_config(folder)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def save_hf_folder(state_dict: dict, base_folder: str, dest: str, tokenizer: str,
                   provenance: dict[str, Any]) -> str:
    """Write an HF model folder (safetensors, config, tokenizer, generation config) at `dest`, atomically.

    The model is rebuilt from the base config on meta and the trained tensors are assigned, so no second
    copy of the weights is allocated; weights are cast to the base model's dtype. `dest` may be s3:// or
    gs://: the folder is then written locally and uploaded.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformllm_ray.models.assets import load_tokenizer
    from transformllm_ray.storage import is_remote

    dtype = export_dtype(base_folder)
    config = AutoConfig.from_pretrained(base_folder)
    config.use_cache = True  # inference default in the exported config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    res = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if meta_left or res.unexpected_keys:
        raise ValueError(f"export: parameters without trained values {meta_left[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    local_parent = os.path.dirname(dest) if not is_remote(dest) else tempfile.gettempdir()
    os.makedirs(local_parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=local_parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(tokenizer).save_pretrained(tmp)
        gen = os.path.join(base_folder, "generation_config.json")
        if os.path.isfile(gen):
            shutil.copy(gen, os.path.join(tmp, "generation_config.json"))
        with open(os.path.join(tmp, "transformllm_train.json"), "w") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
        if is_remote(dest):
            import pyarrow.fs as pafs

            from transformllm_ray.storage import filesystem, remove

            remove(dest)
            fs, path = filesystem(dest)
            pafs.copy_files(tmp, path, destination_filesystem=fs)
        else:
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def export_hf_from_shards(model, base_folder: str, dest: str, tokenizer: str, rank: int,
                          provenance: dict[str, Any]) -> None:
    """Collective: gather the trained weights to rank 0 (CPU) and write the HF folder there."""
    sd = full_state_dict(model)
    if rank == 0:
        save_hf_folder(sd, base_folder, dest, tokenizer, provenance)
    del sd
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the folder exists when any rank returns
