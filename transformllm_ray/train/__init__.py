"""Train stage: continued pre-training with FSDP2 on Ray Train (`transformllm train --config ...`).

    stage.py        run(cfg): reads the packed Parquet, starts a Ray Train TorchTrainer, writes stats.json
    loop.py         the per-worker training loop (data shard, steps, eval, checkpoints, export)
    model.py        model built on the meta device, base weights loaded into the shards, HF export
    parallelize.py  all sharding in one place: activation checkpointing, then fully_shard per block and root
    optim.py        AdamW with decay groups; linear warm-up then cosine decay (torch's schedulers)
    checkpoint.py   sharded torch.distributed.checkpoint save/restore through ray.train.report
    data.py         the data position (epoch, micro-batch) and the deterministic schedule over a worker's shard
    metrics.py      tokens/s, MFU and its device peak, peak memory; metrics.jsonl + W&B on rank 0

Nothing here imports torch, Ray or transformers at module import time except the modules the workers run.
"""
