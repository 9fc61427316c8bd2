"""Config section `pack`: tokenizer, mix, buckets, tokenising actors."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from transformllm_ray.sections import Section


class DecontamConfig(Section):
    """Decontamination before training (pack/decontam.py): training rows sharing a long word n-gram with an
    eval text (the held-out chunks, `eval.decontaminate_paths`) are rejected as `contaminated`."""

    enabled: bool = True
    """Check every row pack would train on (converted, raw, general, pack.domain_paths) against the eval texts."""

    ngram_words: int = Field(default=13, ge=3)
    """Words per n-gram (13, as NeMo Curator and DataTrove use): a row sharing one such run of words with an
    eval text is contaminated. Words are runs of letters and digits of the lower-cased text."""

    max_matches: Optional[int] = Field(default=10, ge=0)
    """An eval n-gram found in more than this many training documents is common phrasing of the domain (a
    licence's warranty disclaimer, a statute's standard clause), not a leak of one eval item, and is ignored
    (NeMo Curator's max_matches, same default). None: every shared n-gram counts, common or not."""


class PackConfig(Section):
    tokenizer: Optional[str] = None
    """Tokenizer of the model being trained; None = `train.base_model`."""
    domain_paths: list[str] = []
    """Domain training text instead of convert/converted/: Parquet files/folders/globs with a `text` column
    (optionally `id`, `doc_id`, and `split` = train/val; without it every row is train). Empty = the convert
    stage's output."""
    mix_ratio: float = Field(default=1.0, ge=0)
    """General tokens per domain token, per split (the general text is ingest's `general` chunks); 1.0 (1:1)
    was AdaptLLM's best for law. 0 disables mixing. Met to the token: the general chunk that crosses the
    budget is cut."""
    include_raw_chunks: bool = False
    """Also train on the raw (unconverted) chunks of domain documents of which no chunk was converted."""
    bucket_tokens: int = Field(default=16_000_000, ge=1)
    """Tokens per packing bucket. Documents are hashed into buckets of about this many tokens; each bucket is
    packed, written and committed by one worker, so a worker holds one bucket in memory (4 bytes a token) and
    at most one partial window per bucket is dropped: waste <= buckets x seq_len tokens."""
    num_actors: int = Field(default=2, ge=1)
    """Ray Data actors that tokenise pack's input files in parallel."""
    cpus_per_actor: float = Field(default=0.5, gt=0)
    """CPUs reserved per tokenising actor (fractional: see ingest.cpus_per_actor)."""
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig)
    """Rejection of training rows that share a long n-gram with eval text."""
