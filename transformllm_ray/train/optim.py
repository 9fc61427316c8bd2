"""Optimizer and learning-rate schedule: AdamW, linear warm-up then cosine decay, from torch's own classes.

    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)     # call sched.step() once per optimizer step

AdamW with AdaptLLM's settings by default (betas 0.9/0.95, weight decay 0.1). Decay applies to matrices only
(ndim >= 2: linear and embedding weights); norms' gains and biases are not decayed, as in GPT-2/LLaMA
recipes, since pulling a norm gain towards 0 shrinks the activations instead of regularising.

Schedule: LinearLR from lr/(warmup+1) to lr over `warmup_steps`, then CosineAnnealingLR down to
lr * min_lr_ratio at `max_steps`, joined by SequentialLR. Its state_dict is plain numbers: it is saved as JSON
in every checkpoint (trainer_state.json) and restored on resume.
"""

from __future__ import annotations

from transformllm_ray.config import TrainConfig


def build_optimizer(model, tc: TrainConfig):
    import torch

    decay: list = []
    no_decay: list = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused kernel per group instead of one per tensor; works on FSDP2's DTensor shards.
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.betas[0], tc.betas[1]), foreach=True)


def build_scheduler(opt, tc: TrainConfig):
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    decay_steps = max(1, tc.max_steps - tc.warmup_steps)
    cosine = CosineAnnealingLR(opt, T_max=decay_steps, eta_min=tc.lr * tc.min_lr_ratio)
    if tc.warmup_steps == 0:
        return cosine
    warm = LinearLR(opt, start_factor=1.0 / (tc.warmup_steps + 1), end_factor=1.0, total_iters=tc.warmup_steps)
    return SequentialLR(opt, [warm, cosine], milestones=[tc.warmup_steps])
