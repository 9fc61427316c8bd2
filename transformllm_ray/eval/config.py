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
    decontaminate_paths: list[str] = []
    """Eval items training must not contain (benchmark questions, a test set): JSONL/Parquet/text files, folders
    or globs, local or object storage. Pack rejects training rows sharing a `pack.decontaminate.ngram_words`
    n-gram with one of them as `contaminated`, naming the item (`file#B<offset>` or `file#R<row>`), as it
    does for the held-out chunks, which are always checked."""
    decontaminate_text_field: str = "text"
    """Field of a JSONL/Parquet record of `decontaminate_paths` that holds the eval text."""
