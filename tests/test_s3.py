"""Every stage on object storage, against a real S3 server (SeaweedFS on loopback, the `s3_server` fixture).

Inputs, output_dir and train.storage_path are all s3:// URIs; the code under test finds the server only
through AWS_ENDPOINT_URL and the standard credential variables (set by conftest before Ray starts), as a user
reaches MinIO, Ceph RGW or R2. Real licence texts (JSONL, one of them gzipped) and real package READMEs
(Parquet) are uploaded; then ingest, convert (the regex engine; the vLLM engine on S3 is the SmolLM2 test of
tests/convert/test_stage_vllm.py), pack, train with sharded checkpoints, a SIGKILL of a training worker and a
rerun that resumes from the checkpoint on S3, the HF export (downloaded and loaded by transformers), eval and
the report with its PNGs. Finally every object in the bucket is read: the secret key is in none of them (nor in Ray's logs), and
nothing was written to local disk where an s3:// path would land if treated as local.

    .venv/bin/python -m pytest tests/test_s3.py -x -q
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = "s3://tlr/e2e"
STEPS = 40
# Local paths an s3:// URI would land on if some code treated it as a local path ("s3:/tlr/...", made relative
# to the working directory of the driver or of a Ray worker).
LOCAL_LOOKALIKES = ("s3:", "tlr")


def _jsonl(texts: list[str], start: int) -> bytes:
    return "".join(json.dumps({"text": t, "title": f"licence {start + i}"}) + "\n"
                   for i, t in enumerate(texts)).encode()


def _put(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path, compression=None) as f:  # as is: "detect" would gzip a .gz name again
        f.write(data)


def _general_texts(n: int = 60) -> list[str]:
    """READMEs of installed packages (real English prose), as the builtin `package-docs` corpus reads them."""
    from transformllm_ray.sources.builtin import package_doc_files
    from transformllm_ray.sources.readers import RawDoc, read_file

    out: list[str] = []
    for wf in package_doc_files():
        out += [r.text for r in read_file(wf) if isinstance(r, RawDoc) and len(r.text) > 800]
        if len(out) >= n:
            break
    return out[:n]


def upload_corpus(fs, legal_texts: list[str]) -> None:
    """Real licence texts as JSONL (one file gzipped) and package READMEs as Parquet, under ROOT/corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _put(fs, "tlr/e2e/corpus/legal/part-0.jsonl", _jsonl(legal_texts[:60], 0))
    _put(fs, "tlr/e2e/corpus/legal/part-1.jsonl.gz", gzip.compress(_jsonl(legal_texts[60:100], 60)))
    general = _general_texts(30)
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": general, "name": [f"doc {i}" for i in range(len(general))]}), buf,
                   row_group_size=10)
    _put(fs, "tlr/e2e/corpus/general/readmes.parquet", buf.getvalue())


def pipeline_config(tiny_model: str):
    """Every stage on S3: inputs, output_dir, train.storage_path. Tiny sizes (2 cores)."""
    from transformllm_ray.config import config_from_dict

    return config_from_dict({
        "output_dir": f"{ROOT}/out", "seed": 1,
        "input": {"paths": [f"{ROOT}/corpus/legal/part-*"]},      # a glob on S3
        "general": {"paths": [f"{ROOT}/corpus/general/"]},         # a folder on S3
        # JSONL cut in byte ranges, Parquet in row groups, read from S3 by range
        "ingest": {"tokenizer": tiny_model, "chunk_tokens": 200, "shard_bytes": 200_000},
        "split": {"heldout_fraction": 0.1, "val_fraction": 0.1},
        "convert": {"engine": "regex", "model": tiny_model, "max_chunks": 60, "rows_per_file": 16},
        "pack": {"tokenizer": tiny_model},
        "train": {"base_model": tiny_model, "storage_path": f"{ROOT}/checkpoints", "run_name": "s3run",
                  "num_workers": 2, "cpus_per_worker": 1.0, "seq_len": 64, "micro_batch_size": 2,
                  "grad_accum_steps": 1, "max_steps": STEPS, "warmup_steps": 2, "lr": 3e-3,
                  "checkpoint_every": 10, "keep_checkpoints": 2, "eval_every": 20, "eval_batches": 1,
                  "max_failures": 0, "wandb": {"mode": "disabled"}},
        "eval": {"max_sequences": 4, "batch_size": 2},
    })


@pytest.fixture(scope="module")
def e2e(s3_server, ray_local, tiny_model, legal_texts):
    """The corpus uploaded, the config, and a dict the tests fill stage by stage."""
    upload_corpus(s3_server.filesystem(), legal_texts)
    return {"cfg": pipeline_config(tiny_model), "server": s3_server, "stats": {}, "t0": time.time(),
            "cwd_before": set(os.listdir(os.getcwd()))}


def _read_json(uri: str):
    from transformllm_ray.storage import read_json

    return read_json(uri)


def test_ingest_reads_s3_inputs(e2e):
    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import list_files

    cfg = e2e["cfg"]
    stats = e2e["stats"]["ingest"] = run_stage(cfg, "ingest")
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"] == 130
    assert stats["chunks_out"] > stats["rows_out"]
    chunks = list_files(f"{cfg.output_dir}/ingest/chunks", ".parquet")
    assert chunks and all(c.startswith(f"{ROOT}/out/ingest/chunks/") for c in chunks)
    from transformllm_ray.storage import read_parquet

    t = read_parquet(chunks, columns=["kind", "split", "source"])
    kinds, splits = set(t["kind"].to_pylist()), set(t["split"].to_pylist())
    assert kinds == {"domain", "general"} and splits == {"train", "val", "heldout"}, (kinds, splits)
    sources = {s.split("#")[0] for s in t["source"].to_pylist()}
    assert {f"{ROOT}/corpus/legal/part-0.jsonl", f"{ROOT}/corpus/legal/part-1.jsonl.gz",
            f"{ROOT}/corpus/general/readmes.parquet"} <= sources, sources


def test_convert_regex_writes_to_s3(e2e):
    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import list_files, read_parquet

    cfg = e2e["cfg"]
    stats = e2e["stats"]["convert"] = run_stage(cfg, "convert")
    assert stats["rows_in"] == 60 and stats["rows_out"] > 30, stats
    conv = read_parquet(list_files(f"{cfg.output_dir}/convert/converted", ".parquet"))
    assert conv.num_rows == stats["rows_out"] and "\nAnswer: " in conv["text"][0].as_py()


def test_pack_writes_to_s3(e2e):
    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import list_files

    cfg = e2e["cfg"]
    stats = e2e["stats"]["pack"] = run_stage(cfg, "pack")
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    assert list_files(f"{cfg.output_dir}/pack/packed/train", ".parquet")
    assert stats["sequences_train"] >= 40 and stats["sequences_val"] >= 2, stats


def _registered_checkpoint(cfg) -> int:
    """The step of the checkpoint Ray Train's controller has registered (its snapshot on S3), 0 if none."""
    from transformllm_ray.train.stage import storage_path

    try:
        snap = _read_json(f"{storage_path(cfg)}/{cfg.train.run_name}/checkpoint_manager_snapshot.json")
        return int(snap["latest_checkpoint_result"]["checkpoint_dir_name"].split("-")[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0


def _kill_rank1_when_checkpointed(cfg, out: dict, timeout: float = 300) -> threading.Thread:
    """SIGKILL the rank-1 training worker (a real kill) once Ray Train has registered a checkpoint on S3
    (tests/train/test_stage.py does the same on local disk)."""
    def watch():
        end = time.time() + timeout
        info = f"{cfg.stage_dir('train')}/workers/rank-1.json"
        while time.time() < end:
            ckpt = _registered_checkpoint(cfg)
            if ckpt and ckpt < STEPS:
                try:
                    pid = _read_json(info)["pid"]
                except (OSError, ValueError, KeyError):
                    time.sleep(0.1)
                    continue
                os.kill(pid, signal.SIGKILL)
                out.update(pid=pid, checkpoint=ckpt)
                return
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_train_killed_then_resumed_from_s3_checkpoint(e2e):
    from transformllm_ray.stage import recorded, run_stage
    from transformllm_ray.storage import exists
    from transformllm_ray.train.checkpoint import list_checkpoints
    from transformllm_ray.train.stage import storage_path

    cfg = e2e["cfg"]
    killed: dict = {}
    watcher = _kill_rank1_when_checkpointed(cfg, killed)
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray Train raises; the kill is checked below
        run_stage(cfg, "train")  # max_failures=0: the lost worker fails the run
    watcher.join(timeout=5)
    assert killed, "the run ended before a worker could be killed"
    assert not exists(f"{cfg.stage_dir('train')}/stats.json")
    assert recorded(cfg, "train")[0] == "started"
    ckpts = list_checkpoints(storage_path(cfg), cfg.train.run_name)
    assert ckpts and ckpts[-1][1].startswith(f"{ROOT}/checkpoints/s3run/step-"), ckpts

    stats = e2e["stats"]["train"] = run_stage(cfg, "train")  # same run name: resumes from the S3 checkpoint
    start = _read_json(f"{cfg.stage_dir('train')}/workers/rank-0.json")["start_step"]
    assert 0 < killed["checkpoint"] <= start < STEPS, (start, killed)
    assert stats["steps"] == STEPS and stats["state_from"].startswith(f"checkpoint {ROOT}/checkpoints/s3run/")
    rows = [json.loads(line) for line in _bytes(f"{cfg.stage_dir('train')}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once, across the kill
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    steps = [s for s, _ in list_checkpoints(storage_path(cfg), cfg.train.run_name)]
    assert steps == [30, 40], steps  # keep_checkpoints=2, pruned on S3
    files = {os.path.basename(i.path) for i in _listing(f"{ROOT}/checkpoints/s3run/step-00000040")}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"} <= files, files


def _bytes(uri: str) -> bytes:
    from transformllm_ray.storage import read_bytes

    return read_bytes(uri)


def _listing(uri: str):
    import pyarrow.fs as pafs

    from transformllm_ray.storage import filesystem

    fs, path = filesystem(uri)
    return fs.get_file_info(pafs.FileSelector(path, recursive=True))


def test_exported_model_on_s3_loads_in_transformers(e2e, tmp_path):
    import pyarrow.fs as pafs
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformllm_ray.storage import filesystem

    cfg = e2e["cfg"]
    model_uri = f"{cfg.stage_dir('train')}/model"
    names = {os.path.basename(i.path) for i in _listing(model_uri)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "transformllm_train.json"} <= names, names
    fs, path = filesystem(model_uri)
    (tmp_path / "model").mkdir()
    pafs.copy_files(path, str(tmp_path / "model"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok("This License applies to", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    prov = json.loads((tmp_path / "model" / "transformllm_train.json").read_text())
    assert prov["steps"] == STEPS and prov["run_name"] == "s3run"
    from safetensors.torch import load_file

    base = load_file(f"{cfg.train.base_model}/model.safetensors")
    trained = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not trained["model.embed_tokens.weight"].equal(base["model.embed_tokens.weight"].to(torch.bfloat16))


def test_eval_reads_the_model_from_s3(e2e):
    from transformllm_ray.stage import run_stage

    cfg = e2e["cfg"]
    stats = e2e["stats"]["eval"] = run_stage(cfg, "eval")
    res = _read_json(f"{cfg.stage_dir('eval')}/eval.json")
    for s in ("heldout_legal", "general"):
        assert res[s]["base"]["tokens"] == res[s]["trained"]["tokens"] > 0, res[s]
        assert res[s]["trained"]["ppl"] != res[s]["base"]["ppl"]
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]


def test_report_and_its_pngs_on_s3(e2e):
    from transformllm_ray.stage import run_stage
    from transformllm_ray.storage import list_files

    cfg = e2e["cfg"]
    run_stage(cfg, "report")
    md = _bytes(f"{cfg.stage_dir('report')}/report.md").decode()
    pngs = [os.path.basename(u) for u in list_files(cfg.stage_dir("report"), ".png")]
    assert {"accounting.png", "training.png", "eval.png", "stage_times.png"} <= set(pngs), pngs
    for png in pngs:
        data = _bytes(f"{cfg.stage_dir('report')}/{png}")
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, png
        assert f"]({png})" in md
    assert f"| ingest | {e2e['stats']['ingest']['rows_in']:,} |" in md


def test_bucket_holds_no_secret_and_nothing_went_to_local_disk(e2e, ray_local):
    server = e2e["server"]
    keys = server.objects()
    fs = server.filesystem()
    secret = server.env.secret_key.encode()
    assert len(secret) > 40
    for stage in ("ingest", "convert", "pack", "train", "eval", "report"):
        assert f"tlr/e2e/out/{stage}/stats.json" in keys, stage
    read = 0
    for key in keys:
        with fs.open_input_stream(key) as f:
            data = f.read()
        assert secret not in data, key
        assert server.env.access_key.encode() not in data, key
        read += len(data)
    assert len(keys) > 50 and read > 1_000_000, (len(keys), read)
    # Nor in Ray's logs: the credentials reach the workers through the environment they inherit, never
    # through a runtime env (which Ray's runtime-env agent logs, values included).
    session = ray_local._private.worker._global_node.get_session_dir_path()
    for dirpath, _, files in os.walk(session):
        for fn in files:
            p = os.path.join(dirpath, fn)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    assert secret not in f.read(), p

    # Nothing landed where a misread s3:// URI would: the driver's and a Ray worker's working directories.
    @ray_local.remote(num_cpus=0)
    def worker_cwd() -> str:
        return os.getcwd()

    for d in {os.getcwd(), ray_local.get(worker_cwd.remote())}:
        assert not [n for n in LOCAL_LOOKALIKES if os.path.exists(os.path.join(d, n))], d
    assert set(os.listdir(os.getcwd())) <= e2e["cwd_before"] | {".pytest_cache"}
    print(f"[s3] {len(keys)} objects, {read / 1e6:.1f} MB read; pipeline {time.time() - e2e['t0']:.0f} s")
