"""All sharding of the model in one function, in torchtitan's order: activation checkpointing, then FSDP2
(`fully_shard`) per decoder block, then on the root. The model code (transformers) holds no FSDP calls.

    mesh = init_device_mesh("cpu", (2,))             # or "cuda"; one dimension: data parallel (FSDP)
    model = parallelize(build_meta_model(folder), mesh, cfg.train, device_type="cpu")

Per block: each decoder block is one FSDP unit, so only one block's full parameters exist at a time (its
all-gather overlaps the previous block's compute on GPU). The last block keeps its parameters after forward
(`reshard_after_forward=False`): backward starts with it at once, so resharding it would only re-gather it.
The root unit holds the embeddings, the final norm and the (tied) output head.

Resharding (`train.fsdp_reshard`): `always` frees each block's gathered parameters after its forward and
backward (two all-gathers and one reduce-scatter per micro-batch, least memory); `per_step` keeps them
gathered from the first forward of an optimizer step to its last backward and reduce-scatters gradients
once (one all-gather and one reduce-scatter per step: DDP's memory, a third less traffic at one micro-batch
per step, far less with accumulation). auto = always on GPU, per_step on CPU: with SmolLM2-135M on 2
one-thread gloo workers, the all-gathers and reduce-scatters took ~2.4 s of a ~4.7 s step under `always`
(2-core machine, shared, noisy).

Mixed precision (`train.mixed_precision`): auto = bf16 parameters and compute with fp32 gradient reduction on
GPU (the standard FSDP2 policy; fp32 master weights stay in the optimizer's shards), fp32 on CPU (CPU bf16
matmuls are slower than fp32 on most x86 cores without AMX).

With no mesh (a single in-process worker, `train.num_workers=0`) only activation checkpointing applies.
"""

from __future__ import annotations

from typing import Optional

from transformllm_ray.config import TrainConfig
from transformllm_ray.train.model import decoder_blocks


def compute_dtype(tc: TrainConfig, device_type: str) -> str:
    """`bf16` or `fp32`: what `train.mixed_precision` resolves to on this device."""
    if tc.mixed_precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return tc.mixed_precision


def reshard_mode(tc: TrainConfig, device_type: str) -> str:
    """`always` or `per_step`: what `train.fsdp_reshard` resolves to on this device."""
    if tc.fsdp_reshard == "auto":
        return "always" if device_type == "cuda" else "per_step"
    return tc.fsdp_reshard


def mp_policy(tc: TrainConfig, device_type: str):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype(tc, device_type) == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_activation_checkpointing(model) -> int:
    """Wrap every decoder block so its activations are recomputed in backward; returns the block count."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # Non-reentrant: works with FSDP2's hooks and with inputs that do not require grad.
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)


def parallelize(model, mesh: Optional[object], tc: TrainConfig, device_type: str = "cpu"):
    """Activation checkpointing (if `train.activation_checkpointing`), then fully_shard per block and on the
    root over `mesh`. Returns the same model object (fully_shard changes modules in place)."""
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    policy = mp_policy(tc, device_type)
    always = reshard_mode(tc, device_type) == "always"
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=always and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=always)
    return model


def set_micro_batch(model, last: bool, mode: str) -> None:
    """Before each micro-batch's backward, in `per_step` mode: keep parameters gathered and gradients
    unsharded until the step's last micro-batch, which reduce-scatters the accumulated gradients once."""
    if mode == "per_step" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
