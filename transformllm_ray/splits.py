"""Document-level split assignment, shared by convert (skips held-out documents) and pack (writes them).

    is_heldout(doc_id, cfg.split)   # raw held-out legal text: never converted, never trained on
    is_val(doc_id, cfg.split)       # validation sequences come from these documents only

Assignment is a pure function of the document id (a content hash) and `split.seed`, so it is the same on
every machine and rerun, and no document can land in two splits.
"""

from __future__ import annotations

from transformllm_ray.config import SplitConfig
from transformllm_ray.text import unit_fraction


def is_heldout(doc_id: str, split: SplitConfig) -> bool:
    return unit_fraction(doc_id, split.seed, "heldout") < split.heldout_fraction


def is_val(doc_id: str, split: SplitConfig) -> bool:
    return not is_heldout(doc_id, split) and unit_fraction(doc_id, split.seed, "val") < split.val_fraction
