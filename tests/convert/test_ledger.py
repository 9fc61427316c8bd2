"""The exactly-once commit protocol on real files: uncommitted leftovers of a kill are dropped, committed
work is kept, pending chunks are known, another config's work is refused."""

from __future__ import annotations

import os

import pytest

from transformllm_ray.convert.ledger import Ledger
from transformllm_ray.schema import make_reject
from transformllm_ray.stage import StageChanged
from transformllm_ray.storage import read_parquet


def _conv(cid):
    return {"id": cid, "doc_id": cid[:3], "split": "train", "text": "t", "raw_output": "[]", "task_families": "summary", "response_ids": "",
            "engine": "vllm", "model": "m", "model_revision": "r", "prompt_version": "legal/v1", "sampling": "{}",
            "input_tokens": 1, "output_tokens": 2, "finish_reason": "stop", "status": "ok", "attempts": 1,
            "seconds": 0.1}


def _ids(led):
    """Ids of the committed converted/ and rejects/ files, as the done-ids dataset gives them."""
    return {r["id"] for r in led.done_ids_ds().iter_rows()}


def test_commit_recover_state(ray_local, tmp_path):
    out = str(tmp_path / "convert")
    led = Ledger(out, "fp1")
    assert led.recover() == 0
    k1 = led.commit([_conv("aaa-0")], [make_reject("convert", "bbb-0", "looping").__dict__],
                    [{"id": "ccc-0", "doc_id": "ccc", "split": "val", "text": "t", "tasks": "[]"}], {"attempt": 1})
    # A second commit whose marker never got written (the driver was killed after its files).
    k2 = led.commit([_conv("ddd-0")], [], [], {"attempt": 1})
    os.remove(f"{out}/_commits/{k2}.json")
    open(f"{out}/converted/.tmp-1234-part-x.parquet", "w").write("half a file")
    assert sorted(os.listdir(f"{out}/converted")) == sorted([f"part-{k1}.parquet", f"part-{k2}.parquet",
                                                            ".tmp-1234-part-x.parquet"])
    assert Ledger(out, "fp1").recover() == 1  # the uncommitted part file
    assert os.listdir(f"{out}/converted") == [f"part-{k1}.parquet"]  # and the temporary is gone
    led = Ledger(out, "fp1")
    assert led.counts() == (2, 1)
    assert _ids(led) == {"aaa-0", "bbb-0"}
    assert read_parquet(led.pending_files())["id"].to_pylist() == ["ccc-0"]
    # The retry of ccc-0 is committed: it is done, no longer pending.
    led.commit([], [make_reject("convert", "ccc-0", "truncated").__dict__], [], {"attempt": 2})
    assert led.counts() == (3, 0) and _ids(led) == {"aaa-0", "bbb-0", "ccc-0"}
    with pytest.raises(StageChanged, match="different config"):
        Ledger(out, "fp2").recover()


def test_commit_refuses_an_id_twice(tmp_path):
    led = Ledger(str(tmp_path), "fp")
    led.recover()
    with pytest.raises(AssertionError, match="twice"):
        led.commit([_conv("aaa-0")], [make_reject("convert", "aaa-0", "looping").__dict__], [], {"attempt": 1})
