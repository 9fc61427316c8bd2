"""Ingest stage end to end on a real local Ray: reject reasons, reconciliation, stable ids, resume after a
real kill, rerun does nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.ingest import stage as ingest
from transformllm_ray.stage import run_stage
from transformllm_ray.storage import list_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_OFFSETS: dict[str, dict[str, int]] = {}  # messy corpus folder -> byte offsets of its duplicate lines


def _tables(out):
    return pq.read_table(f"{out}/ingest/chunks"), pq.read_table(f"{out}/ingest/rejects")


@pytest.fixture
def messy_corpus(tmp_path, legal_texts):
    """A folder with one file or line for every kind of bad input, around real licence texts."""
    d = tmp_path / "corpus"
    d.mkdir()
    good = [t for t in legal_texts if 1000 < len(t) < 4000][:6]
    lines = [json.dumps({"text": good[0]}), "{broken", json.dumps({"body": good[1]}), "",
             json.dumps({"text": "Too short."}), json.dumps({"text": good[0]}),  # exact duplicate, same file
             json.dumps({"text": "x" * 6000})]  # over max_chars below
    (d / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    (d / "b.jsonl").write_text(json.dumps({"text": good[2]}) + "\n" + json.dumps({"text": good[0]}) + "\n")
    _OFFSETS[str(d)] = {"a6": sum(len(x.encode()) + 1 for x in lines[:5]), "b2": len(json.dumps({"text": good[2]})) + 1}
    (d / "c.txt").write_text(good[3])
    (d / "d.txt").write_bytes(b"\x00\x01ELF" * 300)
    pq.write_table(pa.table({"text": [good[4], None]}), d / "e.parquet")
    pq.write_table(pa.table({"content": [good[5]]}), d / "f.parquet")
    (d / "g.csv").write_text("a,b\n")
    return d


def test_reject_reasons_and_reconciliation(ray_local, tmp_path, messy_corpus):
    cfg = load_config(write_config(tmp_path, input={"paths": [str(messy_corpus)]},
                                   ingest={"max_chars": 5000, "chunk_tokens": 256, "shard_bytes": 1}))
    stats = ingest.run(cfg)
    chunks, rejects = _tables(cfg.output_dir)
    reasons = sorted(rejects["reason"].to_pylist())
    assert reasons == sorted(["invalid_json", "wrong_schema", "empty", "too_short", "duplicate", "too_long",
                              "non_utf8", "duplicate", "binary", "empty", "wrong_schema", "unsupported_format"])
    # rows: a.jsonl 8 lines, b.jsonl 2, c.txt 1, d.txt 1, e.parquet 2, f.parquet 1 (file reject), g.csv 1
    assert stats["rows_in"] == 16
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    assert stats["rows_out"] == len(set(chunks["doc_id"].to_pylist())) == 4
    assert stats["rows_rejected"] == rejects.num_rows == 12
    assert max(chunks["n_tokens"].to_pylist()) <= 256
    # The copy in b.jsonl (another shard) is the rejected one: the first occurrence is kept.
    dup_refs = [r["ref"] for r in rejects.to_pylist() if r["reason"] == "duplicate"]
    kept = {s for s in chunks["source"].to_pylist()}
    a6, b2 = (f"#B{_OFFSETS[str(messy_corpus)][k]:012d}" for k in ("a6", "b2"))
    assert any(s.endswith("a.jsonl#B000000000000") for s in kept)
    assert not any(s.endswith("b.jsonl" + b2) for s in kept)
    assert stats["reject_reasons"]["duplicate"] == 2
    assert any(r.endswith("a.jsonl" + a6) for r in dup_refs)
    assert any(r.endswith("b.jsonl" + b2) for r in dup_refs)
    for r in rejects.to_pylist():
        assert r["stage"] == "ingest" and r["ref"] and len(r["excerpt"]) <= 200


def test_rerun_of_finished_stage_does_nothing(ray_local, tmp_path):
    cfg = load_config(write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 40}))
    first = run_stage(cfg, "ingest")
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(cfg.output_dir) for p in fs}
    again = run_stage(cfg, "ingest")
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(cfg.output_dir) for p in fs}
    assert again == first and before == after


def test_changed_config_on_finished_stage_is_refused(ray_local, tmp_path):
    from transformllm_ray.stage import StageChanged

    path = write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 10})
    run_stage(load_config(path), "ingest")
    with pytest.raises(StageChanged, match=r"holds a finished run made from other inputs \(ingest.chunk_tokens: 1800 -> 100\)"):
        run_stage(load_config(path, ["ingest.chunk_tokens=100"]), "ingest")


def test_resume_after_kill_finishes_without_duplicates(ray_local, tmp_path):
    """kill -9 the whole job mid-stage, rerun the same command: same output as an uninterrupted run."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    args = ["input.max_files=150", "ingest.shard_bytes=20000", "ingest.num_actors=1", "ray.num_cpus=2"]
    path = write_config(tmp_path, input={"builtin": "licensedcode"})
    cfg = load_config(path, args)
    cmd = [sys.executable, "-m", "transformllm_ray.cli", "ingest", "--config", path, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    markers = f"{cfg.output_dir}/ingest/_markers"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [f for f in os.listdir(markers) if f.endswith(".json")] if os.path.isdir(markers) else []
        if len(done) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        out = proc.stdout.read().decode(errors="replace")[-3000:]
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed: {out}")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster and actors: a real crash
    proc.wait()
    assert not os.path.exists(f"{cfg.output_dir}/ingest/stats.json")
    # Ray's workers outlive the killed driver by a moment and may commit one more shard: count the committed
    # markers (temporaries skipped) once the count has stopped moving.
    n_done, prev = len(list_files(markers, ".json")), -1
    while n_done != prev:
        time.sleep(1.0)
        prev, n_done = n_done, len(list_files(markers, ".json"))
    n_shards = len(ingest.plan_shards(ingest.list_work_files(cfg), cfg.ingest.shard_bytes))
    assert 3 <= n_done < n_shards

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming: {n_done}/{n_shards} units already done" in rerun.stdout
    # A quiet console: the stage's lines only; Ray's and the workers' output is in the log (console.py).
    assert len(rerun.stdout.splitlines()) <= 5 and not rerun.stderr.strip(), rerun.stdout + rerun.stderr
    assert "Started a local Ray instance" in open(f"{cfg.output_dir}/logs/driver.log").read()
    chunks, rejects = _tables(cfg.output_dir)
    ids = chunks["id"].to_pylist()
    assert len(ids) == len(set(ids))
    stats = json.load(open(f"{cfg.output_dir}/ingest/stats.json"))
    assert stats["rows_in"] == 150 == stats["rows_out"] + stats["rows_rejected"]
    assert stats["chunks_out"] == len(ids)

    # Same ids as an uninterrupted run of the same plan (in-process, on the test session's Ray).
    clean = load_config(write_config(tmp_path / "clean", input={"builtin": "licensedcode"}), args)
    ingest.run(clean)
    ref = pq.read_table(f"{clean.output_dir}/ingest/chunks")
    assert sorted(ref["id"].to_pylist()) == sorted(ids)
    assert rejects.num_rows == pq.read_table(f"{clean.output_dir}/ingest/rejects").num_rows


def _chunk_rows(out):
    t = pq.read_table(f"{out}/ingest/chunks").sort_by("id")
    return t.select(["id", "doc_id", "source", "kind", "split", "position", "text", "n_tokens"]).to_pylist()


def test_large_files_are_cut_into_shards_with_the_same_ids(ray_local, tmp_path, legal_texts):
    """Two large files, JSONL and Parquet: cut into byte-range (JSONL) and row-group (Parquet) shards spread
    over two actors, and read from another folder, they yield exactly the chunks, ids and references of the
    same files read as one shard each: ids depend on content only, not on the path, the cut or which actor
    took which shard. Every shard is used. (One pair of runs: each ingest run costs more than its files.)"""
    d = tmp_path / "in"
    d.mkdir()
    jsonl = legal_texts[:120] + legal_texts[:5]  # five exact duplicates per file, to be found across shards
    parquet = legal_texts[120:240] + legal_texts[120:125]
    (d / "big.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(jsonl)))
    # Uncompressed, so that both files are cut into several shards at one shard_bytes (~9 and ~4).
    pq.write_table(pa.table({"text": parquet, "n": list(range(len(parquet)))}), d / "big.parquet", row_group_size=10,
                   compression="none")
    moved = tmp_path / "elsewhere" / "in"
    shutil.copytree(d, moved)
    sizes = [os.path.getsize(f) for f in d.iterdir()]
    runs = {}
    for name, folder, shard_bytes in (("whole", d, max(sizes) + 1), ("cut", moved, max(sizes) // 9)):
        cfg = load_config(write_config(tmp_path / name, input={"paths": [str(folder)]},
                                       ingest={"chunk_tokens": 256, "shard_bytes": shard_bytes}))
        stats = ingest.run(cfg)
        rows = _chunk_rows(cfg.output_dir)
        for r in rows:  # the reference names the file read; everything else must not depend on where it is
            assert r["source"].startswith(f"{folder}/big."), r["source"]
            r["source"] = r["source"].removeprefix(f"{folder}/")
        rejects = pq.read_table(f"{cfg.output_dir}/ingest/rejects")["ref"].to_pylist()
        runs[name] = (stats, rows, sorted(x.removeprefix(f"{folder}/") for x in rejects))
    (s1, c1, r1), (s2, c2, r2) = runs["whole"], runs["cut"]
    assert s1["shards"] == 2 and s2["shards"] >= 12
    assert c1 == c2 and len(c1) > 240 and len({c["id"] for c in c1}) == len(c1)
    assert {c["source"].rsplit("#", 1)[-1][0] for c in c2} == {"B", "R"}  # byte offsets and row numbers
    assert r1 == r2 and len(r1) >= 10
    # Exact duplicates: the ten copies. Near-duplicates among the licences: the same, however the files are cut.
    assert s2["reject_reasons"]["duplicate"] == 10 and set(s2["reject_reasons"]) <= {"duplicate", "near_duplicate"}
    assert s1["reject_reasons"] == s2["reject_reasons"] and s1["near_dup"]["removed"] > 0
    assert s2["rows_in"] == len(jsonl) + len(parquet) == s2["rows_out"] + sum(s2["reject_reasons"].values())
    # Every shard held work: each file's pieces spread over its shards.
    parts = [pq.read_table(p) for p in list_files(f"{tmp_path}/cut/out/ingest/chunks", ".parquet")]
    assert len(parts) == s2["shards"] and sum(p.num_rows > 0 for p in parts) >= s2["shards"] - 2


def test_general_text_is_ingested_and_tagged(ray_local, tmp_path, legal_texts):
    """Domain and general sources go through the same cleaning and dedup; chunks carry kind and split."""
    from transformllm_ray.splits import assign_split

    d = tmp_path / "general"
    d.mkdir()
    (d / "g.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in legal_texts[200:230])
                               + json.dumps({"body": "short"}) + "\n")
    cfg = load_config(write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 40},
                                   general={"paths": [str(d)], "text_field": "body"},
                                   split={"heldout_fraction": 0.2, "val_fraction": 0.2}))
    stats = ingest.run(cfg)
    rows = _chunk_rows(cfg.output_dir)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"domain", "general"}
    general = [r for r in rows if r["kind"] == "general"]
    assert all("g.jsonl#B" in r["source"] for r in general)
    # A document's split is its id's, unless near-duplicate clustering gave it its cluster's (counted).
    moved = {r["doc_id"] for r in rows if r["split"] != assign_split(r["doc_id"], cfg.split)}
    assert len(moved) == stats["near_dup"]["resplit"]
    assert {r["split"] for r in rows} == {"train", "val", "heldout"}
    by = stats["by_kind_split"]
    assert sum(v["tokens"] for v in by["general"].values()) == stats["general_tokens"] == sum(
        r["n_tokens"] for r in general)
    assert stats["domain_tokens"] + stats["general_tokens"] == stats["tokens_out"]
    assert stats["reject_reasons"].get("too_short", 0) >= 1  # the general "short" line, same filter
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
