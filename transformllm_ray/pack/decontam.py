"""Decontamination: training text that shares a long word n-gram with an eval text is rejected as
`contaminated`, naming the eval item. Pack's phase A0 (stage.py), before tokenising.

    transformllm pack --config configs/debug-local.yaml        # on by default: pack.decontaminate
    transformllm pack --config configs/debug-local.yaml eval.decontaminate_paths='[evals/mmlu_law.jsonl]'

Eval texts: the held-out chunks of ingest (both eval sets: `heldout_legal` and `general`) and the records of
the files named in `eval.decontaminate_paths` (JSONL, Parquet, text; local or object storage; their
`eval.decontaminate_text_field`). Training texts: every row pack would tokenise (converted rows, raw chunks,
general chunks, `pack.domain_paths` rows).

An n-gram is `pack.decontaminate_ngram` (13, as NeMo Curator and DataTrove use) consecutive words of the
lower-cased text, words being runs of letters and digits (punctuation and spacing do not hide a copy). Each
n-gram is a 64-bit hash: a stable hash per word (BLAKE2b), combined over the window by a polynomial in NumPy
(one vectorised pass per text, not a Python loop per n-gram).

A0 writes one index part per eval source (`_decontam/<unit>.parquet`: hash, item = the eval item's reference;
one row per distinct n-gram of the source) as Ray tasks; the driver holds their names only. Each tokenising
actor loads the parts once (a sorted uint64 array and an item index: 12 bytes per distinct eval n-gram, e.g.
~60 MB for the held-out 1% of a 500M-token corpus) and looks up every n-gram of every training text
(np.searchsorted). A row with a hit goes to `rejects/<unit>.parquet` as `contaminated`, its detail naming the
eval item and its excerpt the shared words; a rerun after a kill rewrites a unit's rejects and tokens together.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

import numpy as np
import pyarrow as pa

from transformllm_ray.resources import SHUFFLE_TASK_CPUS
from transformllm_ray.storage import exists, list_files, read_json, read_parquet, write_json_atomic, write_parquet_atomic

REASON = "contaminated"
INDEX_SCHEMA = pa.schema([("hash", pa.uint64()), ("item", pa.string())])
_WORD = re.compile(r"\w+")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial base and the final mix's multiplier


def words(text: str) -> list[str]:
    """The words an n-gram is made of: runs of letters and digits of the lower-cased text."""
    return _WORD.findall(text.lower())


class NGramHasher:
    """64-bit hashes of a text's `n`-word windows. Word hashes are cached (a corpus has far fewer distinct
    words than words); the cache is bounded by clearing it when it grows past `max_words`."""

    def __init__(self, n: int, max_words: int = 1_000_000):
        self.n, self.max_words = n, max_words
        self._cache: dict[str, int] = {}

    def _word(self, w: str) -> int:
        h = self._cache.get(w)
        if h is None:
            if len(self._cache) >= self.max_words:
                self._cache.clear()
            h = self._cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        return h

    def window_hashes(self, ws: list[str]) -> np.ndarray:
        """One hash per window, in text order (len(ws) - n + 1 of them; none for a shorter text)."""
        m = len(ws) - self.n + 1
        if m <= 0:
            return np.empty(0, np.uint64)
        w = np.fromiter((self._word(x) for x in ws), np.uint64, len(ws))
        h = np.zeros(m, np.uint64)
        with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
            for i in range(self.n):
                h = h * _MUL + w[i:i + m]
            h ^= h >> np.uint64(31)
            h *= _MUL
            h ^= h >> np.uint64(29)
        return h


class EvalIndex:
    """The eval n-grams, sorted, each with the index of the eval item it was first seen in."""

    def __init__(self, hashes: np.ndarray, items: np.ndarray, names: list[str]):
        self.hashes, self.items, self.names = hashes, items, names

    @classmethod
    def load(cls, parts: Iterable[str]) -> "EvalIndex":
        parts = list(parts)
        if not parts:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int32), [])
        t = read_parquet(parts, columns=["hash", "item"])
        enc = t["item"].combine_chunks().dictionary_encode()
        hashes = t["hash"].to_numpy()
        items = enc.indices.to_numpy().astype(np.int32)
        order = np.argsort(hashes, kind="stable")  # a hash in two sources: the first source's item names it
        hashes, items = hashes[order], items[order]
        first = np.ones(len(hashes), bool)
        first[1:] = hashes[1:] != hashes[:-1]
        return cls(hashes[first], items[first], enc.dictionary.to_pylist())

    def __len__(self) -> int:
        return len(self.hashes)

    def without(self, hashes: np.ndarray) -> "EvalIndex":
        """The index less some n-grams (the common ones)."""
        keep = ~np.isin(self.hashes, hashes)
        return EvalIndex(self.hashes[keep], self.items[keep], self.names)

    def hits(self, window_hashes: np.ndarray) -> np.ndarray:
        """The distinct windows found in the index."""
        if not len(self.hashes) or not len(window_hashes):
            return np.empty(0, np.uint64)
        pos = np.searchsorted(self.hashes, window_hashes).clip(max=len(self.hashes) - 1)
        return np.unique(window_hashes[self.hashes[pos] == window_hashes])

    def first_hit(self, window_hashes: np.ndarray) -> tuple[int, str] | None:
        """(window position, eval item) of the first window found in the index, or None."""
        if not len(self.hashes) or not len(window_hashes):
            return None
        pos = np.searchsorted(self.hashes, window_hashes).clip(max=len(self.hashes) - 1)
        hit = np.flatnonzero(self.hashes[pos] == window_hashes)
        if not len(hit):
            return None
        j = int(hit[0])
        return j, self.names[int(self.items[pos[j]])]


def index_table(records: Iterable[tuple[str, str]], n: int) -> pa.Table:
    """(hash, item) rows of the distinct n-grams of (item, text) records; the first item names a shared one."""
    hasher = NGramHasher(n)
    hashes: list[np.ndarray] = []
    items: list[str] = []
    for item, text in records:
        h = np.unique(hasher.window_hashes(words(text)))
        if len(h):
            hashes.append(h)
            items += [item] * len(h)
    if not hashes:
        return INDEX_SCHEMA.empty_table()
    t = pa.table({"hash": pa.array(np.concatenate(hashes), pa.uint64()), "item": pa.array(items, pa.string())},
                 schema=INDEX_SCHEMA)
    h = t["hash"].to_numpy()
    _, first = np.unique(h, return_index=True)
    return t.take(pa.array(np.sort(first)))


def heldout_records(uri: str) -> Iterable[tuple[str, str]]:
    """(chunk id, text) of an ingest chunk part's held-out chunks."""
    import pyarrow.compute as pc

    t = read_parquet(uri, columns=["id", "split", "text"])
    t = t.filter(pc.equal(t["split"], "heldout"))
    return zip(t["id"].to_pylist(), t["text"].to_pylist())


def eval_file_records(uri: str, size: int, text_field: str) -> Iterable[tuple[str, str]]:
    """(reference, text) of a user's eval file's records; a record that cannot be read is an error (the user
    named the file to check against: a silent skip would let its items through unchecked)."""
    from transformllm_ray.sources.readers import RawDoc, WorkFile, detect_format, read_file

    for rec in read_file(WorkFile(uri=uri, size=size, fmt=detect_format(uri)), text_field=text_field):
        if not isinstance(rec, RawDoc):
            if rec.reason == "empty":  # a blank line or text: no item, nothing to check
                continue
            raise ValueError(f"eval.decontaminate_paths: {rec.ref}: {rec.reason}: {rec.detail} (set "
                             f"eval.decontaminate_text_field to the field holding the eval text)")
        yield rec.ref, rec.text


def _build_part(unit: dict, n: int, text_field: str) -> None:
    """Ray task: one eval source's index part, then its marker (counts of n-grams and items)."""
    if unit["role"] == "heldout":
        records = heldout_records(unit["uri"])
    else:
        records = eval_file_records(unit["uri"], unit["size"], text_field)
    t = index_table(records, n)
    write_parquet_atomic(t, unit["out"])
    write_json_atomic(unit["out"] + ".json", {"ngrams": t.num_rows, "items": len(set(t["item"].to_pylist()))})


def build_index(units: list[dict], n: int, text_field: str) -> dict[str, int]:
    """Write the index parts not yet marked: one Ray task per eval source (role heldout: an ingest chunk part;
    role file: a user's eval file), in parallel; the driver holds their references, then their counts."""
    import ray

    task = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_build_part)
    ray.get([task.remote(u, n, text_field) for u in units if not exists(u["out"] + ".json")])
    marks = [read_json(u["out"] + ".json") for u in units]
    return {"eval_ngrams": sum(m["ngrams"] for m in marks), "eval_items": sum(m["items"] for m in marks)}


# ------------------------------------------------------------------------------------ common n-grams
def _load_index(parts: list[str]) -> EvalIndex:
    return EvalIndex.load(parts)


def _hit_pairs(rows: pa.Table, index: EvalIndex, hasher: NGramHasher, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(eval n-gram, document key) pairs, distinct, of the eval n-grams found in each row's text."""
    from transformllm_ray.pack.stage import order_key

    hs: list[np.ndarray] = []
    ds: list[np.ndarray] = []
    for doc, text in zip(rows["doc_id"].to_pylist(), rows["text"].to_pylist()):
        hit = index.hits(hasher.window_hashes(words(text or "")))
        if len(hit):
            hs.append(hit)
            ds.append(np.full(len(hit), order_key(seed, doc), np.uint64))
    if not hs:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    pairs = np.unique(np.stack([np.concatenate(hs), np.concatenate(ds)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _map_unit(unit: dict, cfg_json: str, index: EvalIndex, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ray task: a training unit's (eval n-gram, document) pairs, partitioned by n-gram."""
    import json

    from transformllm_ray.config import config_from_dict
    from transformllm_ray.pack.stage import unit_rows

    cfg = config_from_dict(json.loads(cfg_json))
    rows, _ = unit_rows(cfg, unit["role"], unit["uri"])
    h, d = _hit_pairs(rows, index, NGramHasher(cfg.pack.decontaminate.ngram_words), cfg.seed)
    p = (h % np.uint64(parts)).astype(np.int64)
    out = [(h[p == i], d[p == i]) for i in range(parts)]
    return out if parts > 1 else out[0]  # type: ignore[return-value]


def _reduce(out: str, max_matches: int, *pairs: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """Ray task: one n-gram partition's documents per n-gram; writes the n-grams found in more than
    max_matches documents. Returns (n-grams found in training, of them common)."""
    h = np.concatenate([p[0] for p in pairs]) if pairs else np.empty(0, np.uint64)
    d = np.concatenate([p[1] for p in pairs]) if pairs else np.empty(0, np.uint64)
    if len(h):
        both = np.unique(np.stack([h, d], axis=1), axis=0)  # a document in two units counts once
        grams, docs = np.unique(both[:, 0], return_counts=True)
    else:
        grams, docs = np.empty(0, np.uint64), np.empty(0, np.int64)
    common = grams[docs > max_matches]
    write_parquet_atomic(pa.table({"hash": pa.array(common, pa.uint64())}), out)
    return len(grams), len(common)


def common_ngrams(cfg_json: str, units: list[dict], index_parts: list[str], out_dir: str, max_matches: int,
                  parts: int) -> dict[str, int]:
    """Find the eval n-grams that more than `max_matches` training documents contain: a map-reduce of Ray tasks
    over the training units (n-gram, document) pairs; the driver holds references only. Writes
    `common-<p>.parquet` parts, then `common.json` (counts); a finished pass is not redone."""
    import ray

    marker = f"{out_dir}/common.json"
    if exists(marker):
        return read_json(marker)
    index = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_load_index).remote(index_parts)
    mapper = ray.remote(num_cpus=SHUFFLE_TASK_CPUS, num_returns=parts)(_map_unit)
    mapped = [mapper.remote(u, cfg_json, index, parts) for u in units]
    if parts == 1:
        mapped = [[m] for m in mapped]
    reducer = ray.remote(num_cpus=SHUFFLE_TASK_CPUS)(_reduce)
    counts = ray.get([reducer.remote(f"{out_dir}/common-{i:03d}.parquet", max_matches, *[m[i] for m in mapped])
                      for i in range(parts)])
    result = {"eval_ngrams_in_training": sum(c[0] for c in counts), "common_ngrams_ignored": sum(c[1] for c in counts)}
    write_json_atomic(marker, result)
    return result


def common_parts(out_dir: str) -> list[str]:
    return [u for u in list_files(out_dir, ".parquet") if u.rsplit("/", 1)[-1].startswith("common-")]


def index_parts(out_dir: str) -> list[str]:
    return [u for u in list_files(out_dir, ".parquet") if u.rsplit("/", 1)[-1].startswith("index-")]
