"""Config section `eval`: perplexity sets' size and optional lm-eval tasks."""

from __future__ import annotations


from transformllm_ray.sections import Section


class EvalConfig(Section):
    max_sequences: int = 64
    """Sequences (of train.seq_len) scored per set; bounds eval time."""
    batch_size: int = 4
    """Sequences per forward pass."""
    lm_eval_tasks: list[str] = []
    """Optional lm-eval-harness tasks (their data must be available locally)."""
