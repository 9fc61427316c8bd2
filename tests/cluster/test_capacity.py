"""Every config in configs/ fits every shipped cluster: each stage's resource asks can be placed, at once, on
the node types the autoscaler may start, and CPU stages never need a GPU node.

    .venv/bin/python -m pytest tests/cluster/test_capacity.py -q

The asks model and the packing live in tests/cluster/capacity.py. Configs are loaded through
transformllm_ray.config.load_config, so a preset added to configs/ is covered without touching this file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.cluster.capacity import CPU_STAGES, ClusterView, NoFit, fit, stage_asks
from transformllm_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def cluster_views() -> dict[str, ClusterView]:
    return {
        "aws": ClusterView.from_launcher(_load("cluster/aws.yaml")),
        "gcp": ClusterView.from_launcher(_load("cluster/gcp.yaml")),
        "kuberay-rayjob": ClusterView.from_kuberay(_load("cluster/kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]),
        "kuberay-raycluster": ClusterView.from_kuberay(_load("cluster/kuberay/raycluster.yaml")["spec"]),
    }


VIEWS = cluster_views()


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "debug-local.yaml" in names, names


@pytest.mark.parametrize("cluster", sorted(VIEWS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_stage_fits(config, cluster):
    view = VIEWS[cluster]
    assert view.has_gpus, f"{cluster}: no GPU node type"
    asks = stage_asks(load_config(config), gpu_cluster=True)
    for stage, units in asks.items():
        try:
            fit(view, units)
        except NoFit as e:
            raise AssertionError(f"{config.name} on {cluster}: stage {stage}: {e}") from None
    for stage in CPU_STAGES:
        try:
            fit(view, asks[stage], allow_gpu_nodes=False)
        except NoFit as e:
            raise AssertionError(f"{config.name} on {cluster}: {stage} would need a GPU node: {e}") from None


@pytest.mark.parametrize("cluster", sorted(VIEWS))
def test_every_worker_type_has_a_use(cluster):
    """A node type no stage of any config can use is dead weight (or a typo in its resources)."""
    view = VIEWS[cluster]
    used: Counter = Counter()
    for config in CONFIGS:
        for stage, units in stage_asks(load_config(config)).items():
            used.update(fit(view, units, allow_gpu_nodes=stage not in CPU_STAGES))
    assert set(view.workers) <= set(used), f"{cluster}: unused node types {set(view.workers) - set(used)}"


def test_debug_config_lands_where_expected():
    """The embedded default on AWS: ingest on one CPU worker, training's 2 GPU workers on one GPU node."""
    asks = stage_asks(load_config(REPO / "configs/debug-local.yaml"))
    view = VIEWS["aws"]
    assert fit(view, asks["ingest"]) == Counter({"cpu_worker": 1})
    assert fit(view, asks["train"]) == Counter({"gpu_worker": 1})
    assert fit(view, asks["convert"]) == Counter({"gpu_worker": 1})


# ------------------------------------------------------------------------------------ the check can fail
@pytest.mark.parametrize("cluster", sorted(VIEWS))
@pytest.mark.parametrize("override, stage", [
    ("train.num_workers=17", "train"),                 # 17 GPUs > 2 nodes x 8
    ("convert.vllm.tensor_parallel_size=16", "convert"),  # no single node has 16 GPUs
    ("convert.vllm.num_engines=17", "convert"),         # 17 one-GPU engines > 16 GPUs
    ("train.cpus_per_worker=1000", "train"),            # no node has 1,000 CPUs
])
def test_oversized_asks_are_rejected(cluster, override, stage):
    asks = stage_asks(load_config(REPO / "configs/debug-local.yaml", [override]))
    with pytest.raises(NoFit):
        fit(VIEWS[cluster], asks[stage])


@pytest.mark.parametrize("cluster", sorted(VIEWS))
def test_cpu_stage_too_big_for_cpu_nodes_is_rejected(cluster):
    """An ingest actor wider than any CPU node would pull a GPU node in: the CPU-only rule catches it."""
    asks = stage_asks(load_config(REPO / "configs/debug-local.yaml", ["ingest.cpus_per_actor=40"]))
    fit(VIEWS[cluster], asks["ingest"])  # a GPU node has the CPUs...
    with pytest.raises(NoFit):
        fit(VIEWS[cluster], asks["ingest"], allow_gpu_nodes=False)  # ...but ingest must not need one


def test_capping_a_node_type_is_noticed():
    """The same cluster with its GPU type capped at 0 nodes cannot train: the view follows the file."""
    cfg = _load("cluster/aws.yaml")
    cfg["available_node_types"]["gpu_worker"]["max_workers"] = 0
    asks = stage_asks(load_config(REPO / "configs/debug-local.yaml"))
    with pytest.raises(NoFit):
        fit(ClusterView.from_launcher(cfg), asks["train"])
