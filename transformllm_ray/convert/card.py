"""The converted dataset's card: `convert/README.md`, written with stats.json at the end of the stage.

    write_card(cfg, stats)

A Hugging Face dataset card (YAML front matter + Markdown): its `configs` entry points at
`converted/*.parquet`, so `datasets.load_dataset("<output_dir>/convert")` or
`load_dataset("parquet", data_files="<output_dir>/convert/converted/*.parquet")` loads the training text,
and the folder can be pushed to the Hub as it is (`huggingface-cli upload`). The card says how the data was
made (counts, engine, model, prompt version, sampling, cost) and where the source text came from, whose
licence the derived text inherits. It holds no secret: the stats it reads carry none.
"""

from __future__ import annotations

import json
from typing import Any

from transformllm_ray.config import Config
from transformllm_ray.storage import write_bytes_atomic

BUILTIN_SOURCES = {
    "licensedcode": "licence and notice texts from the `licensedcode-data` package; each text keeps its own "
                    "terms, and the collection its package's licence",
    "package-docs": "README files of installed Python packages, each under its package's licence",
}


def source_note(cfg: Config) -> str:
    src = cfg.input
    if src.builtin:
        return BUILTIN_SOURCES[src.builtin]
    return "your files " + ", ".join(f"`{p}`" for p in src.paths[:5]) + (" ..." if len(src.paths) > 5 else "")


def card_text(cfg: Config, stats: dict[str, Any]) -> str:
    c = cfg.convert
    cost = stats.get("cost") or {}
    reasons = stats.get("reject_reasons") or {}
    front = "\n".join([
        "---",
        "license: other",
        "task_categories: [text-generation]",
        "language: [en]",
        "tags: [transformllm, reading-comprehension, continued-pretraining, synthetic]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: converted/*.parquet",
        "---",
    ])
    rows = [
        ("rows in (chunks selected)", stats["rows_in"]), ("rows converted", stats["rows_out"]),
        ("rows rejected", f"{stats['rows_rejected']} ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})"
         if reasons else stats["rows_rejected"]),
        ("engine", stats.get("engine")), ("model", stats.get("model")),
        ("model revision / endpoint", stats.get("model_revision")), ("prompt version", stats.get("prompt_version")),
        ("tasks per chunk", c.tasks_per_chunk),
        ("sampling", json.dumps(stats.get("sampling", {}), sort_keys=True)),
        ("input / output tokens", f"{stats.get('input_tokens', 0):,} / {stats.get('output_tokens', 0):,}"),
    ]
    if cost:
        rows.append(("cost", f"{cost['total']:,.4f} {cost['currency']} at convert.cost prices"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""{front}

# Reading-comprehension text made by TransformLLM-Ray

Each row of `converted/*.parquet` is one chunk of raw domain text followed by tasks about it and the
converter's answers (summary, explanation, inference, questions with answers, word-to-text, completion),
the layout of the TransformLLM paper (arXiv 2410.21479), for continued pre-training. Columns: `text` (the
training text), `split` (`train` or `val`; held-out documents are never converted), provenance (`engine`,
`model`, `model_revision`, `prompt_version`, `sampling`, `response_ids`) and token counts. Rejected chunks
are in `rejects/` with their reason.

| | |
|---|---|
{table}

## Source and licence

The passages are from {source_note(cfg)}. The text here is derived from them: check their terms before you
share it. The answers were written by the model named above, under its own terms of use.

## Loading

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="converted/*.parquet", split="train")
```
"""


def write_card(cfg: Config, stats: dict[str, Any]) -> str:
    uri = f"{cfg.stage_dir('convert')}/README.md"
    write_bytes_atomic(uri, card_text(cfg, stats).encode())
    return uri
