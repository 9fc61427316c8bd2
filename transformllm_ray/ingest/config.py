"""Config sections read by ingest: `ingest` (cleaning, chunking, work shards) and `split` (which documents are
held out or validation, assigned once by ingest)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from transformllm_ray.sections import Section


class IngestConfig(Section):
    tokenizer: Optional[str] = None
    """Tokenizer that bounds chunk length (local folder, hub name or builtin:...). None = `convert.model`, so
    chunks fit the converter's context."""

    chunk_tokens: int = Field(default=1800, ge=16)
    """Maximum tokens per chunk. 1,800 as in AdaptLLM, so raw text plus tasks fits a 2,048-token window."""

    min_chars: int = Field(default=200, ge=1)
    """Documents shorter than this after normalisation are rejected (`too_short`)."""

    max_chars: int = 5_000_000
    """Documents longer than this are rejected (`too_long`): ~1.2M tokens, far past any useful document and a
    sign of a concatenated dump or a broken line."""

    excerpt_chars: int = 200
    """Length of the excerpt stored with each reject."""

    shard_bytes: int = Field(default=4_000_000, ge=1)
    """Work shards of about this many input bytes: small files are grouped, large files are split (Parquet by
    row groups, uncompressed JSONL by byte ranges cut on line boundaries); a compressed file or a whole-file
    text document is one shard. A shard is the unit of parallelism and of resume: each finished shard leaves
    a completion marker, so a kill costs at most the shards in flight."""

    num_actors: int = Field(default=2, ge=1)
    """Ray Data actors that process shards in parallel."""

    cpus_per_actor: float = Field(default=0.5, gt=0)
    """CPUs reserved per actor. Fractional on purpose: an actor pool holding every CPU of a 2-CPU machine
    starves Ray Data's other tasks and hangs."""

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        if self.max_chars <= self.min_chars:
            raise ValueError("ingest.max_chars: must be greater than ingest.min_chars")
        return self


class SplitConfig(Section):
    heldout_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    """Fraction of documents (by id hash) kept as raw held-out text: never converted, never trained on; the
    eval stage measures perplexity on it."""

    val_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    """Fraction of the remaining documents (by id hash) whose packed sequences form the validation split."""

    seed: int = 0
    """Salt of the id hash that assigns documents to splits."""

