"""The pipeline as a job on a Ray cluster of several nodes, every output on the S3 server; worker nodes lost
mid-stage; a resubmission redoes nothing.

    .venv/bin/python -m pytest tests/jobs/test_cluster.py -x -q -s

A head that runs no tasks and two worker nodes (tests/jobs/raycluster.py: each node its own `ray start`, all
ports free ones), `ray job submit --working-dir . -- python -m jobs.pipeline` with output_dir on the S3
server (tests/s3server.py; the nodes reach it through the standard AWS variables only). While the job runs, a
watcher kills the worker node that holds an ingest actor once ingest has committed two shards, the node of
the regex engine actor once convert has committed a batch, the node of a tokenising actor once pack has
marked two files, the node of a training worker once a checkpoint is registered, and starts a fresh node
after each loss, as an autoscaler would. The job must succeed with every stage reconciling, every chunk id once, training resumed from its
checkpoint within the job (FailureConfig) and every step logged once; nothing may land on the nodes' local
disk outside Ray's temp dir; a secret passed in the runtime env reaches no object; a second submission redoes
nothing. A local output_dir is refused on this cluster before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.jobs.raycluster import BIN, LocalCluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_KEY = "0123456789abcdef0123456789abcdef76543210"  # W&B-key-shaped; W&B is offline, nothing is sent
STAGES = ("ingest", "convert", "pack", "train", "eval", "report")


def settings(out: str, model: str) -> list[str]:
    # ~20 ingest shards: enough work units to lose a node between two of them, few enough for a 2-core machine
    # running four Ray nodes.
    return [f"output_dir={out}", "input.max_files=40", "general.max_files=6", "ingest.shard_bytes=24000",
            "convert.engine=regex", "convert.max_chunks=48", "convert.rows_per_file=3", f"ingest.tokenizer={model}",
            f"train.base_model={model}", "train.max_steps=30", "train.warmup_steps=1", "train.seq_len=64",
            "train.micro_batch_size=2", "train.checkpoint_every=5", "train.max_failures=3",
            "train.cpus_per_worker=0.5", "train.eval_every=0", "eval.max_sequences=4", "ray.num_cpus=null"]


@pytest.fixture
def cluster(s3_server, tmp_path):
    """Head (0 CPUs: runs no task) + 2 worker nodes of 2 logical CPUs; HOME and the nodes' working directory
    are empty folders we can inspect afterwards."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    # Node death declared after ~4-7 s (health checks every 1 s, 4 misses of 3 s) instead of Ray's default
    # 15-25 s (every 3 s, 5 misses of 10 s): the recovery measured is ours, not the detector's wait; a cloud
    # cluster tunes the same settings (RAY_health_check_*) on its head.
    env = {**os.environ, "HOME": str(home), "RAY_max_direct_call_object_size": "8192",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
           "RAY_health_check_failure_threshold": "4"}
    for k in ("WANDB_API_KEY", "HF_TOKEN"):
        env.pop(k, None)
    c = LocalCluster(env)
    old = os.getcwd()
    os.chdir(cwd)  # `ray start` runs its nodes from here
    try:
        c.start(head_cpus=0)
        for name in ("w1", "w2"):
            c.add_worker(name, cpus=2)
    finally:
        os.chdir(old)
    yield c, home, cwd
    c.stop()


def _submit(c: LocalCluster, args: list[str], wait: bool = True):
    runtime_env = {"env_vars": {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                "TOKENIZERS_PARALLELISM": "false"}}
    cmd = [f"{BIN}/ray", "job", "submit", "--address", c.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.pipeline", "--config", "configs/debug-local.yaml", *args]
    for _ in range(30):
        r = subprocess.run(cmd, cwd=REPO, env=c.env, capture_output=True, text=True, timeout=1500)
        # The dashboard answers before its job agent is up; Ray says to retry, and no job was created.
        if "No available agent to submit job" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


class Watcher:
    """Kills worker nodes at chosen moments of the running job and records when and what it took to recover."""

    def __init__(self, c: LocalCluster, fs, out: str):
        self.c, self.fs, self.out = c, fs, out.removeprefix("s3://")
        self.events: list[dict] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.spare = iter(("w3", "w4", "w5", "w6", "w7"))

    def count(self, folder: str, suffix: str = "") -> int:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.out}/{folder}", allow_not_found=True, recursive=True))
        return sum(1 for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                   and ".tmp" not in i.path)

    def finished(self, stage: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.out}/{stage}/stats.json").type == pafs.FileType.File

    def kill_during(self, stage: str, actor: str, ready, timeout: float = 900, restarted=None) -> None:
        """Once `ready()`, kill the worker node holding a live `actor` of `stage`, start a replacement, and time
        the recovery: until `restarted()` (a new process group took over; training) and until the stage ends."""
        end = time.time() + timeout
        while not self.stop.is_set() and time.time() < end:
            if self.finished(stage):
                self.errors.append(f"{stage} finished before a node could be lost in it")
                return
            node = self.c.node_of_actor(actor) if ready() else None
            if node:
                t0 = time.time()
                self.c.kill_worker(node)
                self.c.add_worker(next(self.spare), cpus=2, wait=False)  # a replacement, as an autoscaler adds
                event = {"stage": stage, "node": node, "actor": actor}
                while not self.stop.is_set() and time.time() < end and not self.finished(stage):
                    if restarted is not None and "seconds_to_restart" not in event and restarted(t0):
                        event["seconds_to_restart"] = round(time.time() - t0, 1)
                    time.sleep(0.5)
                event["seconds_to_stage_end"] = round(time.time() - t0, 1)
                self.events.append(event)
                return
            time.sleep(0.3)
        self.errors.append(f"no moment to lose a node in {stage} within {timeout:.0f} s")

    def train_restarted(self, since: float) -> bool:
        """Rank 0 of a new worker group has started (it writes workers/rank-0.json when it starts)."""
        try:
            with self.fs.open_input_stream(f"{self.out}/train/workers/rank-0.json") as f:
                return json.loads(f.read())["started_at"] > since
        except (OSError, KeyError, ValueError):
            return False

    def run(self) -> threading.Thread:
        def go():
            try:
                self.kill_during("ingest", "ShardProcessor", lambda: self.count("ingest/_markers", ".json") >= 2)
                self.kill_during("convert", "RegexCommitStage", lambda: self.count("convert/_commits", ".json") >= 1)
                self.kill_during("pack", "TokenizeUnit", lambda: self.count("pack/_markers", ".json") >= 2)
                # Once Ray Train has registered a checkpoint (its snapshot names one), so the restart resumes it.
                self.kill_during("train", "RayTrainWorker",
                                 lambda: self.count("train/checkpoints/test-run", "checkpoint_manager_snapshot.json"),
                                 restarted=self.train_restarted)
            except Exception as e:  # reported by the test, not lost in a thread
                self.errors.append(f"watcher: {type(e).__name__}: {e}")

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t


def _objects(fs, root: str) -> dict[str, tuple[int, float]]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root.removeprefix("s3://"), recursive=True))
    return {i.path: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}


def _json(fs, path: str):
    with fs.open_input_stream(path.removeprefix("s3://")) as f:
        return json.loads(f.read())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pipeline_on_several_nodes_with_s3_survives_lost_nodes(cluster, s3_server, tiny_model):
    import pyarrow.parquet as pq

    c, home, cwd = cluster
    fs = s3_server.filesystem()
    out = f"{s3_server.bucket_uri}/multinode"
    args = [*settings(out, tiny_model), "train.run_name=test-run"]

    # A local output_dir on this cluster: refused at once, before any work, naming the fix (a driver joining
    # the cluster directly, as a submitted job's does).
    local = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "configs/debug-local.yaml",
                            *settings(str(cwd / "local-out"), tiny_model)], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env={**c.env, "RAY_ADDRESS": c.gcs})
    assert local.returncode != 0 and "share no disk" in local.stderr, local.stdout[-3000:] + local.stderr[-3000:]
    assert not [s for s in STAGES if (cwd / "local-out" / s).exists()]  # its log folder only: no stage ran
    for p in (cwd / "local-out").rglob("*"):  # and the log says why
        p.unlink() if p.is_file() else None

    watcher = Watcher(c, fs, out)
    thread = watcher.run()
    t0 = time.time()
    first = _submit(c, args)
    watcher.stop.set()
    thread.join(timeout=30)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert not watcher.errors, watcher.errors
    assert [e["stage"] for e in watcher.events] == ["ingest", "convert", "pack", "train"], watcher.events
    print(f"\nfirst submit {time.time() - t0:.0f} s; node losses: {json.dumps(watcher.events)}")

    stats = {s: _json(fs, f"{out}/{s}/stats.json") for s in STAGES}
    for s, st in stats.items():
        assert st["rows_in"] == st["rows_out"] + st["rows_rejected"], s
    # Every chunk id once in ingest's output, however many shards were redone after the loss.
    ids = []
    for path in sorted(_objects(fs, f"{out}/ingest/chunks")):
        ids += pq.read_table(path, columns=["id"], filesystem=fs)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == stats["ingest"]["chunks_out"]
    # Training resumed within the job from a checkpoint: every step logged once, in order, to the last.
    with fs.open_input_stream(f"{out.removeprefix('s3://')}/train/metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f.read().decode().splitlines()]
    assert steps == list(range(1, 31)), steps
    assert stats["train"]["steps"] == 30 and stats["train"]["state_from"].startswith("checkpoint"), stats["train"]

    # Nothing on the nodes' local disk outside Ray's temp dir: no output, no checkpoint, no W&B run.
    leftovers = [os.path.join(d, f) for root in (cwd, home) for d, _, fs_ in os.walk(root) for f in fs_]
    assert not [p for p in leftovers if "/.cache/" not in p], leftovers

    # A second submission redoes nothing: every stage skipped, no object rewritten but the report and the log.
    before = {k: v for k, v in _objects(fs, out).items() if "/report/" not in k and "/logs/" not in k}
    second = _submit(c, args)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    for stage in STAGES[:-1]:
        assert f"[{stage}] already finished: skipping" in second.stdout, stage
    after = {k: v for k, v in _objects(fs, out).items() if "/report/" not in k and "/logs/" not in k}
    assert after == before

    # The secret passed in the runtime env reached no object (logs included).
    for path in _objects(fs, out):
        with fs.open_input_stream(path) as f:
            assert FAKE_KEY.encode() not in f.read(), path
