"""Document-level split assignment, made once by ingest and carried as the `split` column downstream.

    assign_split(doc_id, cfg.split)   # "heldout" | "val" | "train"

heldout: raw text never converted, never trained on (eval's perplexity sets); val: validation sequences come
from these documents only; train: the rest. Assignment is a pure function of the document id (a content
hash) and `split.seed`, so it is the same on every machine and rerun, and no document can land in two splits.
Documents that are near each other (ingest/neardup.py) all take the split of their cluster's first document,
so a held-out document has no near-copy in train or val. Only ingest calls it: convert, pack and eval read the
column, so no stage can disagree with another.
"""

from __future__ import annotations

from transformllm_ray.config import SplitConfig
from transformllm_ray.text import unit_fraction

SPLITS = ("train", "val", "heldout")


def assign_split(doc_id: str, split: SplitConfig) -> str:
    if unit_fraction(doc_id, split.seed, "heldout") < split.heldout_fraction:
        return "heldout"
    if unit_fraction(doc_id, split.seed, "val") < split.val_fraction:
        return "val"
    return "train"
