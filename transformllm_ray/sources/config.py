"""Config sections of the raw text sources: `input` (the domain corpus) and `general` (general text)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from transformllm_ray.sections import Section


class SourceConfig(Section):
    """Raw text to read: the fields shared by the domain corpus (`input`) and the general text (`general`)."""

    paths: list[str] = []
    """Files, folders or globs of raw text: local paths or s3:// gs:// URIs (pyarrow filesystems). Formats by
    extension: .jsonl/.json/.ndjson (one JSON object per line), .parquet, .txt/.md (one document per file); a
    .gz .bz2 .zst .lz4 or .xz suffix is decompressed."""

    builtin: Optional[Literal["licensedcode", "package-docs"]] = None
    """A built-in corpus read from installed PyPI packages: `licensedcode` = ScanCode's licence database
    (`licensedcode-data`: ~2,300 licence texts, EULAs, terms of service), the embedded default's domain text;
    `package-docs` = the long descriptions (READMEs) of the installed Python packages, real English prose, the
    embedded default's general text."""

    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """Force one input format instead of detecting it from each file's extension."""

    text_field: str = "text"
    """Field (JSONL) or column (Parquet) that holds the document text."""

    max_files: Optional[int] = Field(default=None, ge=1)
    """Read only the first N input files in sorted order (a small sample for debug runs); None reads all."""

    @property
    def empty(self) -> bool:
        return not self.paths and self.builtin is None


class InputConfig(SourceConfig):
    """The domain corpus (legal by default): chunked, converted, trained on; its held-out split is the eval set."""

    expected_tokens: Optional[int] = None
    """Corpus size in tokens, for `transformllm plan` when the input cannot be listed from where plan runs
    (e.g. a laptop without the bucket's credentials). Ingest's measured count wins once ingest has run."""

    @model_validator(mode="after")
    def _check(self) -> "InputConfig":
        if self.empty:
            raise ValueError("input: set `paths` or `builtin`")
        return self


class GeneralConfig(SourceConfig):
    """General (non-domain) text, mixed into training against forgetting (`pack.mix_ratio`). Ingest reads it
    through the same readers, cleaning, dedup and chunking as the domain corpus; it is never converted. Its
    held-out split is eval's forgetting check. Empty (the default) = no general text."""
