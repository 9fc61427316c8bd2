"""What the pipeline asks Ray for, and whether a cluster definition can ever provide it. Offline: no cloud, no Ray.

    from tests.cluster.capacity import ClusterView, fit, stage_asks
    view = ClusterView.from_launcher(yaml.safe_load(open("cluster/aws.yaml")))
    fit(view, stage_asks(load_config("configs/debug-local.yaml"))["train"])   # -> Counter({"gpu_worker": 1})

A cluster is read the way Ray's autoscaler reads it: launcher YAMLs through `prepare_config` and
`validate_config` (what `ray up` runs before any cloud call), KubeRay specs through
`_derive_autoscaling_config_from_ray_cr` (what the autoscaler sidecar runs on the RayCluster object).

Asks per stage come from transformllm_ray/resources.py, the module the stages place their actors with, on a
cluster with GPUs (so `auto` devices mean GPU here; the stages themselves resolve `auto` from the nodes alive
at that moment, which on a cluster scaled to zero reads as "no GPU": cluster runs name their devices, see
cluster/README.md).
A unit (one dict) must land on one node; all units of a stage must be placed at the same time (fixed pools,
Ray Train's gang). `fit` packs them first-fit-decreasing into open nodes, opening nodes of the types that
can hold them within each type's and the global max_workers, and raises NoFit when a unit has no room.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

CPU_STAGES = ("ingest", "pack")
"""Stages that must run without starting a GPU node."""


class NoFit(AssertionError):
    """A stage's asks cannot all be placed on the cluster at its largest size."""


@dataclass(frozen=True)
class NodeType:
    resources: dict
    max_workers: int

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0)


@dataclass(frozen=True)
class ClusterView:
    head: str
    head_resources: dict
    workers: dict  # name -> NodeType
    max_workers: int

    @classmethod
    def from_autoscaling_config(cls, cfg: dict) -> "ClusterView":
        head = cfg["head_node_type"]
        types = cfg["available_node_types"]
        workers = {name: NodeType(dict(t.get("resources", {})), int(t["max_workers"]))
                   for name, t in types.items() if name != head}
        return cls(head, dict(types[head].get("resources", {})), workers, int(cfg["max_workers"]))

    @classmethod
    def from_launcher(cls, cfg: dict) -> "ClusterView":
        """A cluster launcher YAML, after the launcher's own defaults and checks."""
        from ray.autoscaler._private.util import prepare_config, validate_config

        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
        return cls.from_autoscaling_config(prepared)

    @classmethod
    def from_kuberay(cls, ray_cluster_spec: dict, name: str = "transformllm") -> "ClusterView":
        """A RayCluster spec (or a RayJob's rayClusterSpec), as KubeRay's autoscaler derives node types."""
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        cr = {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(ray_cluster_spec)}
        return cls.from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(cr))

    @property
    def has_gpus(self) -> bool:
        return any(t.gpus > 0 for t in self.workers.values())


def stage_asks(cfg, gpu_cluster: bool = True) -> dict[str, list[dict]]:
    """Per stage, the units the stage asks Ray for: the stages' own pools (transformllm_ray/resources.py), on a
    cluster with or without GPUs."""
    from transformllm_ray.resources import asks

    return asks(cfg, gpus=1 if gpu_cluster else 0)


def _fits(free: dict, unit: dict) -> bool:
    return all(free.get(k, 0) + 1e-9 >= v for k, v in unit.items() if v > 0)


def _take(free: dict, unit: dict) -> None:
    for k, v in unit.items():
        free[k] = free.get(k, 0) - v


def fit(view: ClusterView, units: list[dict], allow_gpu_nodes: bool = True) -> Counter:
    """Place every unit at once; return how many nodes of each worker type that takes. Raises NoFit."""
    nodes = [dict(view.head_resources)]  # the head is always there
    used: Counter = Counter()
    for unit in sorted(units, key=lambda u: (u.get("GPU", 0), u.get("CPU", 0)), reverse=True):
        for free in nodes:
            if _fits(free, unit):
                _take(free, unit)
                break
        else:
            options = [name for name, t in view.workers.items()
                       if used[name] < t.max_workers and _fits(t.resources, unit)
                       and (allow_gpu_nodes or t.gpus == 0)]
            if not options or sum(used.values()) >= view.max_workers:
                raise NoFit(f"no room for {unit} (already placed: {dict(used)}; node types: "
                            f"{ {n: (t.resources, t.max_workers) for n, t in view.workers.items()} })")
            # Units without GPUs prefer CPU-only types, as Ray's autoscaler does; then the smallest type.
            name = min(options, key=lambda n: (unit.get("GPU", 0) == 0 and view.workers[n].gpus > 0,
                                               view.workers[n].gpus, view.workers[n].resources.get("CPU", 0)))
            used[name] += 1
            free = dict(view.workers[name].resources)
            _take(free, unit)
            nodes.append(free)
    return used
