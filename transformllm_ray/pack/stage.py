"""Pack stage: tokenise training texts, mix with general text, join with EOS, pack fixed-length sequences.

    transformllm pack --config configs/debug-local.yaml

Inputs
- domain: the `text` column of `convert/converted/` (or of `pack.domain_paths`, any Parquet with a text
  column, so packing works before/without conversion), plus, with `pack.include_raw_chunks`, the raw chunks of
  documents that were not converted;
- general: `pack.general_paths` / `pack.general_builtin`, mixed in at `pack.mix_ratio` general tokens per
  domain token (AdaptLLM's best for law: 1:1). Documents are taken in a seeded order until the ratio is met;
  the rest are rejected as `general_not_needed` (so rows reconcile), a shortfall is reported, not padded.

Splits are by document (`splits.py`): validation documents go only to `packed/val/`, held-out documents never
reach training. Documents are shuffled with the seed, tokenised with the *training* model's tokenizer (Ray
Data actors), each followed by EOS, concatenated and cut into `train.seq_len` windows; the final partial window
is dropped and counted as waste. Deterministic for a seed.

Outputs (under pack/): `packed/train/part-*.parquet`, `packed/val/part-*.parquet` (input_ids list<int32> of
exactly seq_len, sequence, doc_ids), `heldout/part-00000.parquet` (raw held-out legal chunks for eval: never
converted, never trained on), `general_eval/part-00000.parquet` (held-out general documents, the forgetting
check), and stats.json (tokens in, packed, waste, sequences, mix achieved).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from typing import Any

import pyarrow as pa

from transformllm_ray.config import Config
from transformllm_ray.sources.builtin import BUILTINS
from transformllm_ray.sources.readers import RawDoc, WorkFile, detect_format, read_file
from transformllm_ray.splits import is_heldout, is_val
from transformllm_ray.stage import write_stats
from transformllm_ray.storage import (
    expand_inputs, list_files, makedirs, read_parquet, remove, write_parquet_atomic,
)
from transformllm_ray.text import content_id, normalize

log = logging.getLogger("transformllm")
STAGE = "pack"
SEQS_PER_FILE = 1024
MIN_GENERAL_CHARS = 200


class TokenizeTexts:
    """Ray Data stage: `text` -> `input_ids` (training tokenizer, no special tokens). One row out per row in.

    Input columns: text. __init__ loads the tokenizer once per actor.
    """

    input_columns = ("text",)

    def __init__(self, tokenizer: str):
        from transformllm_ray.models.assets import load_fast_tokenizer

        self.tok = load_fast_tokenizer(tokenizer)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = list(batch["text"])
        ids = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        assert len(ids) == len(texts), "one output row per input row"
        return {**batch, "input_ids": ids, "n_tokens": [len(x) for x in ids]}


def _order_key(seed: int, kind: str, doc_id: str, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{kind}:{doc_id}:{row_id}".encode()).hexdigest()


def domain_rows(cfg: Config) -> list[dict]:
    """Domain training texts: converted rows (status ok), or pack.domain_paths, [+ raw chunks]."""
    rows: list[dict] = []
    if cfg.pack.domain_paths:
        uris = [f.uri for f in expand_inputs(cfg.pack.domain_paths)]
        t = read_parquet(uris)
        if "text" not in t.column_names:
            raise ValueError(f"pack.domain_paths: no `text` column in {uris[0]} (columns {t.column_names})")
        ids = t["id"].to_pylist() if "id" in t.column_names else [None] * t.num_rows
        for i, (rid, text) in enumerate(zip(ids, t["text"].to_pylist())):
            doc_id = t["doc_id"][i].as_py() if "doc_id" in t.column_names else content_id(text or "")
            rows.append({"id": str(rid if rid is not None else i), "doc_id": doc_id, "text": text or "",
                         "kind": "domain"})
        return rows
    conv_dir = f"{cfg.stage_dir('convert')}/converted"
    converted_docs: set[str] = set()
    files = list_files(conv_dir, ".parquet")
    if files:
        t = read_parquet(files, columns=["id", "doc_id", "text", "status"])
        for rid, doc_id, text, status in zip(*(t[c].to_pylist() for c in ("id", "doc_id", "text", "status"))):
            if status == "ok":
                rows.append({"id": rid, "doc_id": doc_id, "text": text, "kind": "domain"})
                converted_docs.add(doc_id)
    elif not cfg.pack.include_raw_chunks:
        raise FileNotFoundError(f"no converted text under {conv_dir}: run `transformllm convert` first, or set "
                                "pack.domain_paths or pack.include_raw_chunks=true")
    if cfg.pack.include_raw_chunks:
        t = read_parquet(list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet"), columns=["id", "doc_id", "text"])
        for rid, doc_id, text in zip(*(t[c].to_pylist() for c in ("id", "doc_id", "text"))):
            if doc_id not in converted_docs and not is_heldout(doc_id, cfg.split):
                rows.append({"id": rid, "doc_id": doc_id, "text": text, "kind": "raw"})
    return rows


def general_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(general documents, rejects) from pack.general_paths / general_builtin, normalised."""
    files: list[WorkFile] = []
    if cfg.pack.general_builtin:
        files += BUILTINS[cfg.pack.general_builtin]()
    if cfg.pack.general_paths:
        files += [WorkFile(f.uri, f.size, detect_format(f.uri)) for f in expand_inputs(cfg.pack.general_paths)]
    rows, rejects, seen = [], [], set()
    for wf in files:
        for rec in read_file(wf):
            if not isinstance(rec, RawDoc):
                rejects.append({"ref": rec.ref, "reason": f"general_{rec.reason}"})
                continue
            text = normalize(rec.text)
            doc_id = content_id(text)
            if len(text) < MIN_GENERAL_CHARS:
                rejects.append({"ref": rec.ref, "reason": "general_too_short"})
            elif doc_id in seen:
                rejects.append({"ref": rec.ref, "reason": "general_duplicate"})
            else:
                seen.add(doc_id)
                rows.append({"id": rec.ref, "doc_id": doc_id, "text": text, "kind": "general"})
    return rows, rejects


def tokenize(cfg: Config, rows: list[dict]) -> list[dict]:
    """Tokenise on Ray Data actors; returns rows with input_ids and n_tokens, in the seeded order of their keys
    (Ray Data may reorder blocks; sorting afterwards keeps packing deterministic without preserve_order)."""
    import ray

    if not rows:
        return []
    n_blocks = max(1, min(64, len(rows) // 64))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(TokenizeTexts, fn_constructor_kwargs={"tokenizer": cfg.pack_tokenizer},
                        batch_size=256, compute=ray.data.ActorPoolStrategy(size=min(2, n_blocks)),
                        num_cpus=0.5, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    out = list(ds.iter_rows())
    out.sort(key=lambda r: _order_key(cfg.seed, r["kind"], r["doc_id"], r["id"]))
    return out


def pack_sequences(docs: list[dict], seq_len: int, eos_id: int) -> tuple[list[dict], int]:
    """Concatenate docs (each + EOS) and cut into seq_len windows. Returns (sequences, tokens dropped)."""
    seqs: list[dict] = []
    buf: list[int] = []
    owners: list[str] = []
    for d in docs:
        buf.extend(list(d["input_ids"]) + [eos_id])
        owners.append(d["doc_id"])
        while len(buf) >= seq_len:
            seqs.append({"input_ids": buf[:seq_len], "doc_ids": sorted(set(owners))})
            buf = buf[seq_len:]
            owners = [d["doc_id"]] if buf else []
    for i, s in enumerate(seqs):
        s["sequence"] = i
    return seqs, len(buf)


def _write_split(out_dir: str, seqs: list[dict]) -> None:
    makedirs(out_dir)
    for uri in list_files(out_dir, ".parquet"):
        remove(uri)  # a rerun of an unfinished pack rewrites the whole split (cheap, deterministic)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("sequence", pa.int64()),
                        ("doc_ids", pa.list_(pa.string()))])
    for k in range(0, max(len(seqs), 1), SEQS_PER_FILE):
        part = seqs[k:k + SEQS_PER_FILE]
        table = pa.Table.from_pylist(part, schema=schema)
        write_parquet_atomic(table, f"{out_dir}/part-{k // SEQS_PER_FILE:05d}.parquet")


def write_heldout(cfg: Config) -> int:
    """Raw held-out legal chunks (never converted, never trained on) for the eval stage."""
    files = list_files(f"{cfg.stage_dir('ingest')}/chunks", ".parquet")
    t = read_parquet(files, columns=["id", "doc_id", "text"]) if files else pa.table(
        {"id": pa.array([], pa.string()), "doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    mask = pa.array([is_heldout(d, cfg.split) for d in t["doc_id"].to_pylist()], pa.bool_())
    held = t.filter(mask).sort_by("id")
    write_parquet_atomic(held, f"{cfg.stage_dir(STAGE)}/heldout/part-00000.parquet")
    return held.num_rows


def run(cfg: Config) -> dict:
    from transformllm_ray.models.assets import load_tokenizer

    t0 = time.time()
    out = cfg.stage_dir(STAGE)
    seed, seq_len = cfg.seed, cfg.train.seq_len
    hf_tok = load_tokenizer(cfg.pack_tokenizer)
    eos_id = hf_tok.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {cfg.pack_tokenizer} has no EOS token to join documents with")

    domain = domain_rows(cfg)
    general, rejects = general_rows(cfg) if cfg.pack.mix_ratio > 0 else ([], [])
    # General documents: held-out ones form the forgetting-check set; the rest are candidates for mixing.
    general_eval = [g for g in general if is_heldout(g["doc_id"], cfg.split)]
    general = [g for g in general if not is_heldout(g["doc_id"], cfg.split)]
    empty = [r for r in domain if not r["text"].strip()]
    rejects += [{"ref": r["id"], "reason": "empty"} for r in empty]
    domain = [r for r in domain if r["text"].strip()]

    tok_domain = tokenize(cfg, domain)
    domain_tokens = sum(r["n_tokens"] + 1 for r in tok_domain)
    tok_general: list[dict] = []
    general_cut = 0
    if general:
        budget = int(cfg.pack.mix_ratio * domain_tokens)  # general tokens wanted, EOS included
        tok_all = tokenize(cfg, general)
        have = 0
        for r in tok_all:
            room = budget - have - 1  # tokens left in the budget, before this document's EOS
            if room <= 0:
                rejects.append({"ref": r["id"], "reason": "general_not_needed"})
                continue
            if r["n_tokens"] > room:
                # Cut the document that crosses the budget to its first `room` tokens: taken whole, one long
                # README overshot the demo's 1:1 target by 2.3x (the paper's ratio is a token ratio).
                general_cut += r["n_tokens"] - room
                r = {**r, "input_ids": list(r["input_ids"])[:room], "n_tokens": room}
            tok_general.append(r)
            have += r["n_tokens"] + 1
    general_tokens = sum(r["n_tokens"] + 1 for r in tok_general)

    docs = sorted(tok_domain + tok_general, key=lambda r: _order_key(seed, r["kind"], r["doc_id"], r["id"]))
    val_docs = [d for d in docs if is_val(d["doc_id"], cfg.split)]
    train_docs = [d for d in docs if not is_val(d["doc_id"], cfg.split)]
    train_seqs, train_waste = pack_sequences(train_docs, seq_len, eos_id)
    val_seqs, val_waste = pack_sequences(val_docs, seq_len, eos_id)
    if not train_seqs:
        raise ValueError(f"pack: {domain_tokens + general_tokens} tokens make no full sequence of "
                         f"train.seq_len={seq_len}; convert more chunks or lower train.seq_len")
    _write_split(f"{out}/packed/train", train_seqs)
    _write_split(f"{out}/packed/val", val_seqs)
    n_heldout = write_heldout(cfg)
    geval = pa.table({"id": [g["id"] for g in general_eval], "doc_id": [g["doc_id"] for g in general_eval],
                      "text": [g["text"] for g in general_eval]},
                     schema=pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string())]))
    write_parquet_atomic(geval, f"{out}/general_eval/part-00000.parquet")

    tokens_in = domain_tokens + general_tokens
    packed = (len(train_seqs) + len(val_seqs)) * seq_len
    reasons = collections.Counter(r["reason"] for r in rejects)
    n_in = len(domain) + len(empty) + len(general) + len(general_eval) + sum(
        1 for r in rejects if r["reason"].startswith("general_") and r["reason"] != "general_not_needed")
    stats = {
        "rows_in": n_in,
        "rows_out": len(docs) + len(general_eval),
        "rows_rejected": len(rejects),
        "reject_reasons": dict(sorted(reasons.items())),
        "domain_docs": len(tok_domain), "general_docs": len(tok_general), "general_eval_docs": len(general_eval),
        "heldout_chunks": n_heldout,
        "tokens_in": tokens_in, "domain_tokens": domain_tokens, "general_tokens": general_tokens,
        "mix_ratio_target": cfg.pack.mix_ratio,
        "general_tokens_cut": general_cut,
        "mix_ratio_achieved": round(general_tokens / domain_tokens, 4) if domain_tokens else 0.0,
        "tokens_packed": packed, "waste_tokens": train_waste + val_waste,
        "waste_fraction": round((train_waste + val_waste) / tokens_in, 4) if tokens_in else 0.0,
        "sequences_train": len(train_seqs), "sequences_val": len(val_seqs),
        "train_docs": len(train_docs), "val_docs": len(val_docs),
        "seq_len": seq_len, "tokenizer": cfg.pack_tokenizer, "eos_token_id": eos_id,
        "vocab_size": len(hf_tok), "seed": seed, "seconds": round(time.time() - t0, 3),
    }
    if general and stats["mix_ratio_achieved"] < cfg.pack.mix_ratio * 0.99:
        log.warning("pack: general text ran out: mix ratio %.3f < target %.3f", stats["mix_ratio_achieved"],
                    cfg.pack.mix_ratio)
    return write_stats(cfg, STAGE, stats)


