"""Report stage: real ingest output plus train/eval records -> report.md with the measured figures and PNGs."""

from __future__ import annotations

import json
import os

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.ingest import stage as ingest
from transformllm_ray.report import stage as report


def test_report_shows_what_was_measured(ray_local, tmp_path):
    cfg = load_config(write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 30}))
    ing = ingest.run(cfg)
    tdir = tmp_path / "out" / "train"
    tdir.mkdir(parents=True)
    # Records in the train stage's and eval stage's formats (those stages are tested on their own).
    with open(tdir / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "loss": 3.0 - step * 0.05, "lr": 1e-4 * min(1, step / 5),
                                "grad_norm": 1.0, "tokens_per_s": 900.0 + step, "mfu": 0.01,
                                "val_loss": 2.5 if step % 10 == 0 else None}) + "\n")
    edir = tmp_path / "out" / "eval"
    edir.mkdir()
    (edir / "eval.json").write_text(json.dumps({
        "heldout_legal": {"base": {"ppl": 12.5, "tokens": 100}, "trained": {"ppl": 10.25, "tokens": 100},
                          "ppl_change_pct": -18.0},
        "general": {"base": {"ppl": 20.0, "tokens": 100}, "trained": {"ppl": 20.5, "tokens": 100}}}))
    stats = report.run(cfg)
    out = tmp_path / "out" / "report"
    md = (out / "report.md").read_text()
    assert f"| ingest | {ing['rows_in']:,} | {ing['rows_out']:,} | {ing['rows_rejected']:,} |" in md
    assert "| convert | not run |" in md
    nd = ing["near_dup"]
    assert f"| near-duplicates removed (estimated Jaccard >= threshold) | {nd['removed']:,} |" in md
    assert f"| near-duplicate clusters (largest) | {nd['clusters']:,} ({nd['largest_cluster']:,}) |" in md
    assert "| heldout_legal | 12.500 | 10.250 | -18.00% |" in md
    for png in ("accounting.png", "training.png", "eval.png", "stage_times.png"):
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in md
    assert not (out / "convert.png").exists()  # no conversion ran: no invented plot
    assert stats["rows_in"] == stats["rows_out"] == 1
    for reason, n in ing["reject_reasons"].items():
        assert f"{reason} {n:,}" in md
    assert os.path.exists(out / "summary.json")
