"""Convert stage end to end with the regex engine (AdaptLLM baseline) on real ingest output and a real
local Ray: selection, held-out documents skipped, reconciliation, output schema and layout, rerun no-op."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.schema import Converted, Reject, arrow_schema
from transformllm_ray.stage import run_stage


def test_regex_stage(ray_local, tmp_path):
    cfg = load_config(write_config(
        tmp_path, input={"builtin": "licensedcode", "max_files": 60}, ingest={"chunk_tokens": 256},
        split={"heldout_fraction": 0.2},
        convert={"engine": "regex", "max_chunks": 80, "tasks_per_chunk": 3, "rows_per_file": 16}))
    run_stage(cfg, "ingest")
    stats = run_stage(cfg, "convert")
    out = f"{cfg.output_dir}/convert"
    conv = pq.read_table(f"{out}/converted")
    assert conv.schema.equals(arrow_schema(Converted))
    # Real licence chunks nearly always yield a task (a title at least); rejects/ may hold no file at all.
    rej = pq.read_table(f"{out}/rejects") if os.listdir(f"{out}/rejects") else arrow_schema(Reject).empty_table()
    assert rej.schema.equals(arrow_schema(Reject)) and rej.num_rows == stats["rows_rejected"]

    chunks = pq.read_table(f"{cfg.output_dir}/ingest/chunks").to_pylist()
    eligible = sorted(c["id"] for c in chunks if c["split"] != "heldout")
    heldout = [c for c in chunks if c["split"] == "heldout"]
    assert heldout, "the split must hold out some documents for this test to mean anything"
    ids = conv["id"].to_pylist() + rej["ref"].to_pylist()
    assert sorted(ids) == eligible[:80]                      # the first 80 eligible ids, each exactly once
    assert not {c["id"] for c in heldout} & set(ids)         # held-out documents are never converted
    assert stats["rows_in"] == 80 == stats["rows_out"] + stats["rows_rejected"]
    assert stats["heldout_chunks"] == len(heldout) and stats["beyond_max_chunks"] == len(eligible) - 80
    # Workers commit their batches: at most rows_per_file chunks a commit, at least 80 / 16 commits.
    markers = [json.load(open(f"{out}/_commits/{f}")) for f in os.listdir(f"{out}/_commits")]
    assert stats["engine"] == "regex" and stats["commits"] == len(markers) >= 5
    assert all(m["converted"] + m["rejected"] <= 16 for m in markers)
    assert sum(m["converted"] + m["rejected"] for m in markers) == 80
    split_of = {c["id"]: c["split"] for c in chunks}
    assert all(r["split"] == split_of[r["id"]] for r in conv.to_pylist())  # ingest's split, carried

    text_by_id = {c["id"]: c["text"] for c in chunks}
    for row in conv.to_pylist():
        assert row["status"] == "ok" and row["prompt_version"] == "legal/v1"
        assert row["text"].startswith(text_by_id[row["id"]].strip())     # raw chunk first
        tasks = json.loads(row["raw_output"])
        assert 1 <= len(tasks) <= 3 and row["text"].count("\nAnswer: ") == len(tasks)
        assert row["task_families"].split(",") == [t["kind"] for t in tasks]
    for r in rej.to_pylist():
        assert r["stage"] == "convert" and r["reason"] == "no_tasks" and len(r["excerpt"]) <= 200

    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs}
    assert run_stage(cfg, "convert") == stats  # finished: skipped, nothing rewritten
    assert before == {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs}
