"""Exactly-once bookkeeping of the convert stage: what is committed, what is left, atomic commits.

    ledger = Ledger(cfg.stage_dir("convert"), fingerprint)
    ledger.recover()                       # after a crash: drop uncommitted files and temporaries
    done, waiting = ledger.counts()        # chunks finished; chunks waiting for their retry
    ds = ledger.done_ids_ds()              # Ray Data: ids in committed converted/ or rejects/ (workers read)
    ledger.commit(converted, rejects, pending_rows, info)

A commit holds up to `convert.rows_per_file` finished chunks. Its key is a hash of the chunk ids it holds
(plus the pass), and all its files share that key:

    converted/part-<key>.parquet   schema.Converted rows (status ok)
    rejects/part-<key>.parquet     schema.Reject rows (stage convert, ref = chunk id)
    pending/part-<key>.parquet     first attempts waiting for their retry (only with convert.retry_rejected)
    _commits/<key>.json            the commit marker, written LAST: counts, tokens, config fingerprint

Each file is written atomically (temp + rename); a commit counts only once its marker exists. A kill -9 at
any moment leaves at most one commit's files without a marker: `recover()` deletes them, so their chunks are
redone, and every other chunk id sits in exactly one committed converted/ or rejects/ file. A chunk in a
committed pending/ file and in no committed converted/rejects file goes straight to the retry pass on a rerun:
its first attempt is not redone. Part files never hold an id twice across commits because a chunk is
committed only once per pass and the retry pass only takes ids that are pending and not done.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Any

import pyarrow as pa

from transformllm_ray.convert.select import Selection, check_exactly_once
from transformllm_ray.dataops import map_files
from transformllm_ray.schema import Converted, Reject, to_table
from transformllm_ray.stage import StageChanged
from transformllm_ray.storage import (
    list_files, makedirs, read_json, read_parquet, remove, remove_temporaries, write_json_atomic,
    write_parquet_atomic,
)

STAGE = "convert"
SCHEMA_VERSION = 3
"""Version of the converted/ and pending/ record schemas, in the stage fingerprint: output written with an
older schema is never resumed into (2: `response_ids`; 3: the vLLM engine's response ids too)."""
EXCERPT = 200
"""Characters of a rejected chunk's output kept in its reject row."""
PENDING_SCHEMA = pa.schema([pa.field("id", pa.string(), False), pa.field("doc_id", pa.string(), False),
                            pa.field("split", pa.string(), False), pa.field("text", pa.string(), False),
                            pa.field("tasks", pa.string(), False)])
"""pending/: the chunk, and its first attempt's task results as JSON (family, answer, status, tokens...)."""
DIRS = ("converted", "rejects", "pending")


def commit_key(ids: list[str], attempt: int) -> str:
    return hashlib.sha256(f"pass{attempt}\n".encode() + "\n".join(sorted(ids)).encode()).hexdigest()[:16]


class Ledger:
    def __init__(self, out_dir: str, fingerprint: str):
        self.out = out_dir
        self.fingerprint = fingerprint
        self.marker_dir = f"{out_dir}/_commits"

    def _part(self, sub: str, key: str) -> str:
        return f"{self.out}/{sub}/part-{key}.parquet"

    def markers(self) -> list[dict]:
        return [read_json(u) for u in list_files(self.marker_dir, ".json")]

    def recover(self) -> int:
        """Delete temporaries and part files of commits without a marker; refuse a marker of another config.
        Returns how many uncommitted files were removed."""
        for d in (self.marker_dir, *(f"{self.out}/{s}" for s in DIRS)):
            makedirs(d)
            remove_temporaries(d)
        keys = set()
        for m in self.markers():
            if m.get("fingerprint") != self.fingerprint:
                raise StageChanged(
                    f"convert: {self.out} holds work of a different config (fingerprint {m.get('fingerprint')} "
                    f"!= {self.fingerprint}); rerun with --redo to delete it and redo convert, or use another "
                    "output_dir")
            keys.add(m["key"])
        removed = 0
        for sub in DIRS:
            for uri in list_files(f"{self.out}/{sub}", ".parquet"):
                name = os.path.basename(uri)
                if not (name.startswith("part-") and name[len("part-"):-len(".parquet")] in keys):
                    remove(uri)
                    removed += 1
        return removed

    def counts(self) -> tuple[int, int]:
        """(chunks in committed converted/ or rejects/, chunks in committed pending/ not yet retried), from
        the commit markers alone: a retry commit (attempt 2) takes each of its chunks out of pending/."""
        ms = self.markers()
        done = sum(int(m["converted"]) + int(m["rejected"]) for m in ms)
        retried = sum(int(m["converted"]) + int(m["rejected"]) for m in ms if m.get("attempt") == 2)
        return done, sum(int(m["pending"]) for m in ms) - retried

    def part_files(self, sub: str) -> list[str]:
        """Committed part files of converted/, rejects/ or pending/."""
        return [self._part(sub, m["key"]) for m in self.markers() if sub in m.get("files", [])]

    def done_ids_ds(self, with_pending: bool = False):
        """Ray Data Dataset (column `id`) of the chunk ids in committed converted/ and rejects/ files (and
        pending/ ones: what the first pass must not redo), read by workers; None if nothing is committed."""
        from transformllm_ray.dataops import map_files

        parts = [map_files(self.part_files("converted"), _id_column, {"column": "id"}),
                 map_files(self.part_files("rejects"), _id_column, {"column": "ref"}),
                 map_files(self.part_files("pending"), _id_column, {"column": "id"}) if with_pending else None]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def pending_files(self) -> list[str]:
        return self.part_files("pending")

    def commit(self, converted: list[dict], rejects: list[dict], pending: list[dict], info: dict) -> str:
        ids = [r["id"] for r in converted] + [r["ref"] for r in rejects] + [r["id"] for r in pending]
        assert len(ids) == len(set(ids)), "a chunk appears twice in one commit"
        key = commit_key(ids, info["attempt"])
        files = []
        # Order does not matter for correctness (the marker decides), but rejects first keeps a reader that
        # ignores markers from ever seeing a converted file whose rejects are missing.
        for sub, rows, cls in (("rejects", rejects, Reject), ("pending", pending, None),
                               ("converted", converted, Converted)):
            if not rows:
                continue
            table = to_table(rows, cls) if cls else pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)
            write_parquet_atomic(table, self._part(sub, key))
            files.append(sub)
        write_json_atomic(f"{self.marker_dir}/{key}.json", {
            "key": key, "fingerprint": self.fingerprint, "files": files, "converted": len(converted),
            "rejected": len(rejects), "pending": len(pending), **info})
        return key


def _id_column(uri: str, column: str) -> pa.Table:
    return pa.table({"id": read_parquet(uri, columns=[column])[column]})


# ------------------------------------------------------------------------------------------- accounting
def _output_counts(uri: str, kind: str):
    """One committed part's counts: converted -> (rows, output tokens, ok after retry); rejects -> per reason."""
    import pyarrow as pa

    if kind == "converted":
        t = read_parquet(uri, columns=["output_tokens", "attempts"])
        return pa.table({"key": ["ok"], "rows": [t.num_rows], "output_tokens": [sum(t["output_tokens"].to_pylist())],
                         "retried": [sum(1 for a in t["attempts"].to_pylist() if a > 1)]})
    reasons = collections.Counter(read_parquet(uri, columns=["reason"])["reason"].to_pylist())
    return pa.table({"key": list(reasons), "rows": list(reasons.values()), "output_tokens": [0] * len(reasons),
                     "retried": [0] * len(reasons)},
                    schema=pa.schema([("key", pa.string()), ("rows", pa.int64()), ("output_tokens", pa.int64()),
                                      ("retried", pa.int64())]))


def reconcile(ledger: Ledger, sel: Selection) -> dict[str, Any]:
    """Counts read back from the committed files by workers; fails unless every selected id is in exactly one
    row (select.check_exactly_once)."""
    conv, rej = ledger.part_files("converted"), ledger.part_files("rejects")
    check_exactly_once(sel, conv, rej, ledger.out)
    ok = out_tokens = retried = 0
    reasons: collections.Counter = collections.Counter()
    for kind, files in (("converted", conv), ("rejects", rej)):
        ds = map_files(files, _output_counts, {"kind": kind})
        for r in ds.iter_rows() if ds is not None else []:
            if kind == "converted":
                ok += int(r["rows"])
                out_tokens += int(r["output_tokens"])
                retried += int(r["retried"])
            else:
                reasons[r["key"]] += int(r["rows"])
    return {"rows_out": ok, "rows_rejected": sum(reasons.values()), "reject_reasons": dict(sorted(reasons.items())),
            "output_tokens_ok": out_tokens, "ok_after_retry": retried, "files": len(conv) + len(rej)}
