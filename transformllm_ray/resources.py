"""Devices and Ray resource asks: the one place that decides what each stage runs on and asks Ray for.

    from transformllm_ray.resources import asks, convert_device, train_gpu
    device = convert_device(cfg, cluster_gpus())          # "cuda" or "cpu"
    asks(cfg, gpus=8)["train"]                            # [{"CPU": 4, "GPU": 1}] * train.num_workers

The stages place their actors and tasks with these pools (`Pool.ray_kwargs`), `transformllm plan` prints them,
and the cluster capacity test (tests/cluster/) packs them onto the node types of every shipped cluster file,
so the three cannot drift apart.

Devices. `auto` means "a GPU if the cluster has one" and is resolved from the GPUs Ray reports at the moment a
stage starts (`cluster_gpus()`); on an autoscaling cluster scaled to zero that reads as "no GPU", which is why
cluster configs name their devices (cluster/README.md). Training and eval share one rule (`train.use_gpu`);
convert has its own (`convert.vllm.device`), since converter and trainee are different models.

Pools. A pool is `min_size` units placed at once (fixed actor pools, Ray Train's gang; a unit lands on one
node), growing to `max_size` where Ray Data autoscales it. CPU-side helper stages ask fractional CPUs so that
on a 2-CPU machine the big actors and Ray Data's read tasks always fit (a pool that holds every CPU starves
the read task: a hang, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformllm_ray.config import Config

TASK_CPUS = 0.25
"""CPUs of a small Ray Data task of ours (reading our own parts, tagging ids for a join)."""
SHUFFLE_TASK_CPUS = 1.0
"""CPUs of a near-dup map-reduce task (ingest/neardup.py). A whole CPU on purpose: at most one task per CPU
runs, so the few workers Ray keeps warm take every task in turn; at 0.25 Ray started a fresh worker for most
of the ~40 tiny tasks, each importing pyarrow and our modules, 10x the work on 2 cores."""
SMALL_STAGE_CPUS = 0.1
"""CPUs of convert's prompt and quality-gate actors (per actor, one per engine)."""
REGEX_ACTOR_CPUS = 0.5
"""CPUs of a regex-converter actor; Ray Data grows the pool from 1 to REGEX_MAX_ACTORS."""
REGEX_MAX_ACTORS = 2
EVAL_CPUS = 0.5
"""CPUs of one CPU scoring task of eval (one per set and model; GPU tasks take 1 CPU beside their GPU)."""


@dataclass(frozen=True)
class Pool:
    """`min_size`..`max_size` actors (or workers, or tasks) of `cpus` CPUs and `gpus` GPUs each."""

    min_size: int
    max_size: int
    cpus: float
    gpus: float = 0

    @property
    def unit(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def units(self) -> list[dict[str, float]]:
        """The units that must be placed at once (the pool's minimum)."""
        return [self.unit] * self.min_size

    def actor_pool(self, available: int | None = None, in_flight: int | None = None) -> dict[str, Any]:
        """`compute` and `num_cpus` for `Dataset.map_batches`; `available` caps a fixed pool at the work there is;
        `in_flight`: batches sent to one actor at once (an async actor that overlaps them)."""
        import ray

        lo, hi = self.min_size, self.max_size
        if available is not None:
            lo, hi = min(lo, max(1, available)), min(hi, max(1, available))
        extra = {"max_tasks_in_flight_per_actor": in_flight} if in_flight else {}
        strategy = (ray.data.ActorPoolStrategy(size=lo, **extra) if lo == hi
                    else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, **extra))
        return {"compute": strategy, "num_cpus": self.cpus, **({"num_gpus": self.gpus} if self.gpus else {})}


def cluster_gpus() -> float:
    """GPUs of the running Ray cluster (0 when none, or when an autoscaling cluster has none up yet)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def convert_device(cfg: Config, gpus: float) -> str:
    """Where the vLLM converter runs: `convert.vllm.device`, `auto` = cuda if the cluster has GPUs."""
    d = cfg.convert.vllm.device
    if d != "auto":
        return d
    return "cuda" if gpus > 0 else "cpu"


def train_gpu(cfg: Config, gpus: float) -> bool:
    """Whether training and eval use GPUs: `train.use_gpu`, `auto` = if the cluster has GPUs. `yes` asks for
    GPUs even when none is up yet, so an autoscaling cluster scaled to zero brings one up."""
    if cfg.train.use_gpu == "auto":
        return gpus > 0
    return cfg.train.use_gpu == "yes"


def ingest_pool(cfg: Config) -> Pool:
    n = cfg.ingest.num_actors
    return Pool(n, n, cfg.ingest.cpus_per_actor)


def pack_pool(cfg: Config) -> Pool:
    n = cfg.pack.num_actors
    return Pool(n, n, cfg.pack.cpus_per_actor)


def convert_pools(cfg: Config, device: str) -> dict[str, Pool]:
    """Convert's pools: regex -> {"regex"}; openai -> {"client"} (a fixed pool of light client actors: the
    endpoint does the work); vllm -> {"engine", "prompt", "gate", "client"}. An engine on GPU takes its
    tensor-parallel GPUs on one node and one CPU for the actor itself (an upper bound); on CPU, a placement
    group of `cpus_per_engine` CPUs."""
    c, v = cfg.convert, cfg.convert.vllm
    if c.engine == "regex":
        return {"regex": Pool(1, REGEX_MAX_ACTORS, REGEX_ACTOR_CPUS)}
    if c.engine == "openai":
        return {"client": Pool(c.openai.num_clients, c.openai.num_clients, SMALL_STAGE_CPUS)}
    n = v.num_engines
    engine = Pool(n, n, 1, v.tensor_parallel_size) if device == "cuda" else Pool(n, n, v.cpus_per_engine)
    small = Pool(1, max(1, n), SMALL_STAGE_CPUS)
    # engine clients (ray.data.llm's Serve deployment stage): one per engine, a sliver of a CPU each
    return {"engine": engine, "prompt": small, "gate": small, "client": Pool(n, n, SMALL_STAGE_CPUS)}


def engine_bundles(cfg: Config, device: str) -> list[dict[str, float]]:
    """The placement-group bundles of one convert engine replica (Ray Serve LLM): on CPU, the engine pool's
    unit; on GPU, one GPU per tensor-parallel rank (Serve adds the replica actor's CPU to the first bundle)."""
    if device == "cpu":
        return [convert_pools(cfg, device)["engine"].unit]
    return [{"GPU": 1}] * cfg.convert.vllm.tensor_parallel_size


def train_pool(cfg: Config, gpu: bool) -> Pool | None:
    """Ray Train's workers (one gang); None with train.num_workers=0 (the loop runs in the driver)."""
    tc = cfg.train
    if tc.num_workers == 0:
        return None
    return Pool(tc.num_workers, tc.num_workers, tc.cpus_per_worker, 1 if gpu else 0)


def eval_pool(gpu: bool) -> Pool:
    """One scoring task at a time is what must fit (they run as Ray finds room)."""
    return Pool(1, 1, 1, 1) if gpu else Pool(1, 1, EVAL_CPUS)


def asks(cfg: Config, gpus: float) -> dict[str, list[dict[str, float]]]:
    """Per stage, the units it needs placed at once, on a cluster with `gpus` GPUs (any positive number means
    `auto` devices resolve to GPU)."""
    gpu = train_gpu(cfg, gpus)
    out = {"ingest": ingest_pool(cfg).units(),
           "convert": [u for p in convert_pools(cfg, convert_device(cfg, gpus)).values() for u in p.units()],
           "pack": pack_pool(cfg).units()}
    tp = train_pool(cfg, gpu)
    if tp is not None:
        out["train"] = tp.units()
    out["eval"] = eval_pool(gpu).units()
    return out


def require_ray_data_cpu(held: float, holder: str, fix: str) -> None:
    """Refuse a layout whose actors/workers hold `held` CPUs and leave Ray Data less than one whole CPU.

    Ray 2.60 reads Parquet through a `ListFiles` task that asks for 1 CPU (not settable through read_parquet);
    it cannot start while actors hold the rest, and the stage would hang with no error. `holder` says who holds
    the CPUs, `fix` what to change; both go into the one-line error."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if total - held < 1:
        raise ValueError(f"{holder} hold {held:g} of Ray's {total:g} CPUs and leave Ray Data no whole CPU to "
                         f"list and read files with (a hang): {fix}")


def check_convert_room(cfg: Config, device: str) -> None:
    """A CPU-engine pipeline must leave Ray Data a whole CPU (seen hanging on ray.num_cpus=2: 1 engine CPU +
    0.1 prompt CPU + 1 listing CPU = 2.1)."""
    if device != "cpu" or cfg.convert.engine == "regex":
        return
    v = cfg.convert.vllm
    pools = convert_pools(cfg, device)
    require_ray_data_cpu(
        sum(p.cpus * p.min_size for p in pools.values()),
        f"convert: {v.num_engines} CPU engine(s) x convert.vllm.cpus_per_engine={v.cpus_per_engine} "
        f"(+{SMALL_STAGE_CPUS} per prompt, gate and engine client actor)",
        "raise ray.num_cpus (logical CPUs may exceed cores) or lower convert.vllm.cpus_per_engine")


def check_train_room(cfg: Config, gpu: bool) -> None:
    tc = cfg.train
    pool = train_pool(cfg, gpu)
    if gpu or pool is None:
        return
    require_ray_data_cpu(pool.min_size * pool.cpus,
                         f"train: {tc.num_workers} workers x train.cpus_per_worker={tc.cpus_per_worker}",
                         "lower train.cpus_per_worker (e.g. 0.5) or raise ray.num_cpus")


def describe(cfg: Config, gpus: float) -> list[str]:
    """One line per stage for `transformllm plan`."""
    lines = []
    for stage, units in asks(cfg, gpus).items():
        kinds: dict[str, int] = {}
        for u in units:
            key = ", ".join(f"{k}: {v:g}" for k, v in u.items())
            kinds[key] = kinds.get(key, 0) + 1
        lines.append(f"{stage}: " + " + ".join(f"{n} x {{{k}}}" for k, n in kinds.items()))
    return lines
