"""Config section `train`: initial weights, resume, optimisation, checkpoints, W&B."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from transformllm_ray.sections import BUILTIN_SMOLLM2, Section


class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = WANDB_MODE if set in the environment, else online when WANDB_API_KEY is set, else offline
    (runs under output_dir)."""
    project: str = "transformllm"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); None = the key's default."""


class TrainConfig(Section):
    base_model: str = BUILTIN_SMOLLM2
    """Initial weights: local HF folder, hub name or builtin:.... Separate from `resume`."""
    resume: str = "auto"
    """Crash restart: auto = latest checkpoint of this run name if any; never = start from base_model; or a
    checkpoint folder/URI."""
    run_name: str = Field(default="debug", min_length=1, pattern=r"^[^/]+$")
    """Run name: checkpoints go under storage_path/run_name and a rerun with the same name resumes."""
    storage_path: Optional[str] = None
    """Checkpoint root (local folder or s3:// gs://); None = <output_dir>/train/checkpoints."""
    num_workers: int = Field(default=2, ge=0)
    """Ray Train workers (one per GPU on GPU clusters)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """auto = GPUs when the cluster has them."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs per training worker."""
    seq_len: int = Field(default=2048, ge=8)
    """Packed sequence length in tokens."""
    micro_batch_size: int = Field(default=1, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = Field(default=100, ge=1)
    """Optimizer steps."""
    lr: float = 1e-5
    """Peak learning rate (AdaptLLM: 1e-5)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (AdaptLLM: 0.1)."""
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(default=[0.9, 0.95], min_length=2, max_length=2)
    """AdamW betas (AdaptLLM: 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (AdaptLLM: 1.0)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (saves memory, costs ~30% compute)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 params/compute with fp32 reduction on GPU, fp32 on CPU."""
    fsdp_reshard: Literal["auto", "always", "per_step"] = "auto"
    """When FSDP2 frees gathered parameters. always = after each block's forward and backward, gradients
    reduce-scattered every micro-batch (least memory: one shard plus one block; torchtitan's default).
    per_step = parameters gathered once per optimizer step and gradients reduce-scattered once, after the last
    micro-batch (memory of a full model copy plus full gradients per worker, like DDP; 2/3 of the traffic
    at grad_accum_steps=1, 2/(3k) at k). auto = always on GPU, per_step on CPU, where RAM is plentiful
    and gloo over TCP is the bottleneck."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Steps between sharded checkpoints."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept (Ray Train CheckpointConfig.num_to_keep)."""
    max_failures: int = Field(default=2, ge=-1)
    """Ray Train FailureConfig.max_failures: worker-group restarts from the last checkpoint."""
    log_every: int = Field(default=1, ge=1)
    """Steps between metric logs."""
    eval_every: int = Field(default=50, ge=0)
    """Steps between validation-loss evaluations on the packed val split (also at the last step); 0 = never.
    Logged as val_loss in metrics.jsonl and W&B."""
    eval_batches: int = Field(default=8, ge=1)
    """Micro-batches per worker per evaluation; read once at start and kept in memory, so every evaluation
    scores the same sequences."""
    peak_tflops: Optional[float] = None
    """Device peak for MFU (dense bf16 TFLOP/s per device); None = looked up by device name (H100 989,
    H200 989, A100 312) or measured on CPU."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Experiment tracking."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError("train.warmup_steps: must be below train.max_steps")
        return self
