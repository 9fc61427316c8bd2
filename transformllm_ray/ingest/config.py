"""Config sections read by ingest: `ingest` (cleaning, chunking, work shards) and `split` (which documents are
held out or validation, assigned once by ingest)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from transformllm_ray.sections import Section


class NearDupConfig(Section):
    """Near-duplicate documents (ingest/neardup.py): MinHash over word shingles, LSH banding, clusters."""

    enabled: bool = True
    """Find near-duplicate documents after exact dedup: near-copies are removed (`near_duplicate` rejects) and
    documents near each other share a split, so no held-out document has a near-copy in train or val."""

    shingle_words: int = Field(default=5, ge=1)
    """Words per shingle; similarity is the Jaccard similarity of two documents' shingle sets."""

    num_perm: int = Field(default=128, ge=8, le=1024)
    """MinHash permutations per signature: the estimate's standard error is sqrt(J(1-J)/num_perm), 0.044 at
    J=0.5 with 128."""

    bands: int = Field(default=42, ge=1)
    """LSH bands; documents sharing one band's values are candidate pairs, which the signatures then verify."""

    rows: int = Field(default=3, ge=1)
    """Signature values per band. 42 bands of 3 make a pair at J=0.5 a candidate with probability 0.996 and one
    at 0.2 with 0.28: recall at the split threshold, at the price of verifying more pairs."""

    remove_threshold: float = Field(default=0.8, gt=0, le=1)
    """Estimated Jaccard at or above which a document is a near-copy: of each cluster so linked the first
    (domain before general, then input order) is kept and the others are rejected as `near_duplicate`."""

    split_threshold: float = Field(default=0.4, gt=0, le=1)
    """Estimated Jaccard at or above which documents share a split (the split of their cluster's first
    document). Below 0.5 on purpose: the promise is that no held-out document has a trainable one at true
    Jaccard >= 0.5, and the estimate is off by up to ~0.1 (two standard errors)."""

    seed: int = 0
    """Seed of the MinHash permutations."""

    docs_per_partition: int = Field(default=50_000, ge=1)
    """Documents per partition of the near-dup map-reduce (at most one partition per cluster CPU): ~25 MB of
    band rows and signatures each at the defaults. A small corpus gets one partition, so a few tasks: each
    costs a worker, and starting workers is most of near-dup's time on a small cluster. Changes how the work
    is cut, not the result."""

    @model_validator(mode="after")
    def _check(self) -> "NearDupConfig":
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"ingest.near_dup: bands x rows ({self.bands} x {self.rows}) must be at most "
                             f"num_perm ({self.num_perm})")
        if self.split_threshold > self.remove_threshold:
            raise ValueError("ingest.near_dup.split_threshold: must be at most remove_threshold (a near-copy "
                             "that is removed is also in its cluster)")
        return self


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

    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    """Near-duplicate removal and split clustering."""

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

