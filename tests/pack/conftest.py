"""The ingested corpus the pack tests share: real licence text and real package docs, ingested once for the
package (a Ray Data ingest is the slow part of each test's set-up)."""

from __future__ import annotations

import pytest

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.ingest import stage as ingest

INPUT = {"builtin": "licensedcode", "max_files": 80}
GENERAL = {"builtin": "package-docs", "max_files": 120}  # enough general text for the val split to meet the mix
SPLIT = {"heldout_fraction": 0.1, "val_fraction": 0.1}
INGEST = {"chunk_tokens": 512, "shard_bytes": 300_000}  # several ingest parts: several tokenising units


@pytest.fixture(scope="package")
def ingested(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack")
    cfg = load_config(write_config(tmp, input=INPUT, general=GENERAL, ingest=INGEST, split=SPLIT))
    ingest.run(cfg)
    return cfg
