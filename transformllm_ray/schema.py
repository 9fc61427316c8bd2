"""Record schemas: one dataclass per table, mapped one-to-one onto Parquet columns.

    chunks/     Chunk       token-bounded pieces of cleaned documents (ingest output, convert input)
    rejects/    Reject      every input record or output row a stage could not use, with the reason
    converted/  Converted   reading-comprehension training text with full provenance (convert output)

`arrow_schema(Chunk)` gives the pyarrow schema; `to_table(rows, Chunk)` builds a table from dataclass
instances or dicts. Ids are stable: a document id is a hash of its normalised text, a chunk id is
`<doc_id>-<position>`, so the same input gives the same ids on any machine and any rerun.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Iterable

import pyarrow as pa

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


@dataclass
class Chunk:
    id: str
    """`<doc_id>-<position:04d>`."""
    doc_id: str
    """First 20 hex digits of sha256(normalised document text)."""
    source: str
    """Input reference: file URI, plus `#B<byte offset>` (JSONL: where the line starts in the decompressed
    file) or `#R<row>` (Parquet); independent of how the file was cut into work shards."""
    kind: str
    """`domain` (from `input`: converted, trained on) or `general` (from `general`: mixed into training)."""
    split: str
    """`train`, `val` or `heldout`, by document (splits.assign_split); assigned here, once."""
    position: int
    """Index of the chunk within its document (0-based)."""
    text: str
    """Chunk text (normalised)."""
    n_tokens: int
    """Exact token count under the ingest tokenizer."""
    metadata: str
    """JSON object: other fields of the input record, source name, licence key, ..."""


@dataclass
class Reject:
    stage: str
    """Stage that rejected the record."""
    ref: str
    """Input reference: file URI (+ `#B<byte offset>` / `#R<row>`) or a chunk id."""
    reason: str
    """Short machine-readable reason (`invalid_json`, `duplicate`, `looping`, ...)."""
    detail: str
    """Human-readable detail (parser message, duplicate's keeper, ...)."""
    excerpt: str
    """Bounded excerpt of the rejected text or bytes."""


@dataclass
class Converted:
    id: str
    """Chunk id (unique in converted/ and in converted rejects)."""
    doc_id: str
    """Document id."""
    split: str
    """The chunk's split (`train` or `val`), carried from ingest."""
    text: str
    """Training text: raw chunk followed by the tasks, in the reading-comprehension format (README)."""
    raw_output: str
    """Concatenated raw model outputs (JSON list, one per task)."""
    task_families: str
    """Comma-separated task families, in order."""
    engine: str
    """vllm, openai or regex."""
    model: str
    """Converter model name (or `regex`)."""
    model_revision: str
    """Model revision or content hash of the local weights."""
    prompt_version: str
    """Prompt database version (`<domain>/<version>`)."""
    sampling: str
    """JSON of the sampling parameters used."""
    response_ids: str
    """JSON list of the engine's response ids, one per task (engines openai and vllm); empty for regex."""
    input_tokens: int
    """Prompt tokens sent to the engine, summed over tasks."""
    output_tokens: int
    """Generated tokens, summed over tasks."""
    finish_reason: str
    """Engine finish reasons, comma-separated (stop, length, error)."""
    status: str
    """`ok`, or the reject reason (rows with another status live in rejects/)."""
    attempts: int
    """1, or 2 when the row was retried with other sampling."""
    seconds: float
    """Wall time of the batch this row was generated in, divided by its rows."""


def _arrow_type(tp: Any) -> pa.DataType:
    if tp in _ARROW:
        return _ARROW[tp]
    raise TypeError(f"no Arrow type for {tp!r}")


def arrow_schema(cls: type) -> pa.Schema:
    hints = typing.get_type_hints(cls)
    return pa.schema([pa.field(f.name, _arrow_type(hints[f.name]), nullable=False) for f in fields(cls)])


def column_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def to_table(rows: Iterable[Any], cls: type) -> pa.Table:
    """Rows (dataclass instances or dicts with exactly the schema's keys) -> Arrow table of `cls`'s schema."""
    names = column_names(cls)
    cols: dict[str, list] = {n: [] for n in names}
    for r in rows:
        d = dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else r
        for n in names:
            cols[n].append(d[n])
    return pa.table(cols, schema=arrow_schema(cls))


def make_reject(stage: str, ref: str, reason: str, detail: str = "", excerpt: Any = "", limit: int = 200) -> Reject:
    """A Reject with a bounded excerpt; bytes are shown with invalid UTF-8 replaced."""
    if isinstance(excerpt, (bytes, bytearray)):
        excerpt = bytes(excerpt[: limit * 4]).decode("utf-8", errors="replace")
    text = str(excerpt)
    return Reject(stage=stage, ref=ref, reason=reason, detail=str(detail)[:500], excerpt=text[:limit])
