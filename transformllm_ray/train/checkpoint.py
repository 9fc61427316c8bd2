"""Sharded checkpoints: torch.distributed.checkpoint (DCP) files, persisted by `ray.train.report`.

    save_checkpoint(step, model, opt, state, metrics)          # every rank; a barrier
    state = load_checkpoint(ckpt, model, opt)                   # every rank; returns trainer_state.json

Layout under `<storage_path>/<run_name>/step-<00000050>/` (local folder, s3:// or gs://):
    __0_0.distcp, __1_0.distcp, ...   each rank's shards of model and optimizer state (DCP)
    .metadata                          DCP's index (rank 0)
    trainer_state.json                 step, data position, tokens seen, LR schedule, world size (rank 0)

Each rank writes its DCP files into a local temp folder and hands it to `ray.train.report(checkpoint=...,
checkpoint_dir_name=step-N)`; Ray merges the ranks' folders into one checkpoint folder in storage and keeps
the newest `train.keep_checkpoints`. A restart (FailureConfig) or a rerun with the same run name gets the
latest one from `ray.train.get_checkpoint()`; DCP reshards on load, so the files do not depend on which
rank reads them. Nothing secret is in a checkpoint: tensors and the plain numbers above.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from transformllm_ray.config import local_abspath

STATE_FILE = "trainer_state.json"
STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(step: int, model, opt, state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """Collective: write this rank's shards and report them to Ray Train as the checkpoint of `step`."""
    import ray.train
    import torch.distributed.checkpoint as dcp

    tmp = tempfile.mkdtemp(prefix=f"transformllm-ckpt-{step}-")
    try:
        dcp.save(_state_dicts(model, opt), checkpoint_id=tmp)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2, sort_keys=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=step_dir_name(step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Checkpoint lies, as a URI: `Checkpoint.path` is the path inside its filesystem, which for an
    object store drops the scheme (`bucket/run/step-...`, read as a relative local path in a log)."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    scheme = {"s3": "s3", "gcs": "gs"}.get(kind)
    return f"{scheme}://{checkpoint.path}" if scheme else str(checkpoint.path)


def load_checkpoint(checkpoint, model, opt) -> dict[str, Any]:
    """Collective: restore model and optimizer shards from a Ray Checkpoint; returns its trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with checkpoint.as_directory() as d:
        state_file = os.path.join(d, STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{checkpoint_uri(checkpoint)}: not a transformllm checkpoint (no {STATE_FILE})")
        with open(state_file) as f:
            state = json.load(f)
        sds = _state_dicts(model, opt)
        dcp.load(sds, checkpoint_id=d)
    set_state_dict(model, opt, model_state_dict=sds["model"], optim_state_dict=sds["optim"])
    return state


def restore_scheduler(sched, opt, state: dict[str, Any]) -> None:
    """Load the LR schedule and put its last LR back into the optimizer's groups, which the next cosine
    step reads (the optimizer's own state dict carries it too; this makes the two agree by construction)."""
    sched.load_state_dict(state["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr


def list_checkpoints(storage_path: str, run_name: str) -> list[tuple[int, str]]:
    """(step, uri) of the run's complete checkpoints in storage, oldest first."""
    import pyarrow.fs as pafs

    from transformllm_ray.config import join_uri
    from transformllm_ray.storage import exists, filesystem

    root = join_uri(storage_path, run_name)
    fs, path = filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    out = []
    for info in infos:
        name = os.path.basename(info.path)
        if info.type == pafs.FileType.Directory and name.startswith(STEP_PREFIX) and name[5:].isdigit():
            uri = join_uri(root, name)
            if exists(f"{uri}/{STATE_FILE}"):
                out.append((int(name[5:]), uri))
    return sorted(out)


def checkpoint_from(resume: str) -> Optional[Any]:
    """A Ray Checkpoint for `train.resume` = a checkpoint folder or URI; None for auto/never."""
    if resume in ("auto", "never"):
        return None
    import ray.train

    from transformllm_ray.storage import exists

    if not exists(f"{resume.rstrip('/')}/{STATE_FILE}"):
        raise FileNotFoundError(f"train.resume: {resume} is not a checkpoint folder (no {STATE_FILE})")
    return ray.train.Checkpoint(local_abspath(resume))
