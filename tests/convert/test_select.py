"""convert/select.py on real local Ray and real Parquet parts: the n-th smallest eligible id found from bin
counts equals the brute-force answer at bin boundaries and inside a crowded bin; ineligible rows never count."""

from __future__ import annotations

import hashlib
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transformllm_ray.convert.select import nth_smallest_id


def _parts(tmp_path) -> tuple[list[str], list[str]]:
    """Four parts of chunk ids shaped like ingest's (20 hex digits of a hash, a position), with held-out and
    general rows mixed in, and 40 ids crowded into one bin (same first 4 hex digits)."""
    rng = random.Random(3)
    rows = []
    for i in range(600):
        doc = hashlib.sha256(str(i).encode()).hexdigest()[:20]
        for pos in range(rng.randint(1, 3)):
            rows.append({"id": f"{doc}-{pos:04d}", "kind": rng.choice(["domain"] * 4 + ["general"]),
                         "split": rng.choice(["train"] * 8 + ["val", "heldout"])})
    rows += [{"id": f"abcd{i:016x}-0000", "kind": "domain", "split": "train"} for i in range(40)]
    rng.shuffle(rows)
    files = []
    for k in range(4):
        uri = f"{tmp_path}/part-{k}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[k::4]), uri)
        files.append(uri)
    eligible = sorted(r["id"] for r in rows if r["kind"] == "domain" and r["split"] != "heldout")
    return files, eligible


def test_nth_smallest_id_matches_brute_force(ray_local, tmp_path):
    files, eligible = _parts(tmp_path)
    first_crowded = next(i for i, x in enumerate(eligible) if x.startswith("abcd"))
    for n in (1, first_crowded + 17, len(eligible)):  # first, inside the crowded bin, last
        assert nth_smallest_id(files, n) == eligible[n - 1], n
    with pytest.raises(RuntimeError, match=f"promises {len(eligible) + 1} eligible chunks, the files hold "
                                           f"{len(eligible)}"):
        nth_smallest_id(files, len(eligible) + 1)
