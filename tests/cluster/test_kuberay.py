"""The KubeRay manifests (cluster/kuberay/), checked offline: as YAML with the fields RayJob and RayCluster
need (ray.io/v1, from KubeRay's API types), as the autoscaler sidecar reads them (Ray's own KubeRay code),
against the image they name (cluster/kuberay/Dockerfile), and for secrets.

    .venv/bin/python -m pytest tests/cluster/test_kuberay.py -q

`problems()` lists what is wrong with a RayJob document; the shipped file must have none and each broken
copy in BROKEN must be caught, so the checker is shown to bite.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

from transformllm_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster/kuberay"
RAYJOB = KUBERAY / "rayjob.yaml"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
DOCKERFILE = KUBERAY / "Dockerfile"
SECRET = "transformllm-secrets"
SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_limit(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def cluster_spec_problems(spec: dict) -> list[str]:
    out = []
    if spec.get("rayVersion") != ray.__version__:
        out.append(f"rayVersion {spec.get('rayVersion')!r} != installed ray {ray.__version__}")
    if spec.get("enableInTreeAutoscaling") is not True:
        out.append("enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec") or {}
    if not isinstance(head.get("rayStartParams"), dict):
        out.append("headGroupSpec.rayStartParams missing")
    elif head["rayStartParams"].get("num-cpus") != "0":
        out.append("head must advertise num-cpus '0' so that work asks for workers")
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName", "") for g in groups]
    if len(set(names)) != len(names) or not all(DNS_LABEL.match(n) for n in names):
        out.append(f"groupName must be unique DNS labels: {names}")
    for g in groups:
        n = g.get("groupName")
        if g.get("minReplicas") != 0:
            out.append(f"{n}: minReplicas must be 0")
        if not isinstance(g.get("maxReplicas"), int) or g["maxReplicas"] < 1:
            out.append(f"{n}: maxReplicas must be >= 1")
        if g.get("replicas", 0) > g.get("maxReplicas", 0):
            out.append(f"{n}: replicas above maxReplicas")
        if not isinstance(g.get("rayStartParams"), dict):
            out.append(f"{n}: rayStartParams missing")
    for g in [head, *groups]:
        pod = g.get("template", {}).get("spec", {})
        cs = pod.get("containers") or []
        if not cs or not cs[0].get("name") or not cs[0].get("image"):
            out.append(f"{g.get('groupName', 'head')}: template needs a container with name and image")
            continue
        res = cs[0].get("resources", {})
        if res.get("requests") != res.get("limits"):
            out.append(f"{g.get('groupName', 'head')}: requests != limits (Ray sizes itself from limits)")
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = [m for m in cs[0].get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
        if not shm or not mounts:
            out.append(f"{g.get('groupName', 'head')}: no memory-backed /dev/shm (object store, NCCL)")
    gpu_groups = [g for g in groups if gpu_limit(g) > 0]
    if not gpu_groups:
        out.append("no worker group with nvidia.com/gpu limits")
    if not any(gpu_limit(g) == 0 for g in groups):
        out.append("no CPU worker group (ingest and pack would start GPU pods)")
    for g in gpu_groups:
        tol = g["template"]["spec"].get("tolerations", [])
        if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
            out.append(f"{g['groupName']}: does not tolerate the nvidia.com/gpu taint of GPU nodes")
    return out


def problems(doc: dict) -> list[str]:
    """What keeps `doc` from being a RayJob that runs the pipeline on an autoscaling GPU cluster."""
    out = []
    if doc.get("apiVersion") != "ray.io/v1":
        out.append("apiVersion must be ray.io/v1")
    if doc.get("kind") != "RayJob":
        out.append("kind must be RayJob")
    if not DNS_LABEL.match(doc.get("metadata", {}).get("name", "")):
        out.append("metadata.name must be a DNS label")
    spec = doc.get("spec") or {}
    entry = spec.get("entrypoint", "")
    if not entry.startswith("python -m jobs.pipeline --config "):
        out.append("entrypoint must run `python -m jobs.pipeline --config ...`")
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("shutdownAfterJobFinishes must be true (else the cluster outlives the job)")
    if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
        out.append("runtimeEnvYAML must be a YAML mapping")
    if "rayClusterSpec" not in spec:
        return out + ["spec.rayClusterSpec missing"]
    return out + cluster_spec_problems(spec["rayClusterSpec"])


# ------------------------------------------------------------------------------------------- RayJob
def test_rayjob_has_no_problems():
    assert problems(load(RAYJOB)) == []


def _first_gpu_group(d):
    return next(g for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpu_limit(g))


def _drop_gpu_limits(d):
    for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for part in ("limits", "requests"):
            g["template"]["spec"]["containers"][0]["resources"][part].pop("nvidia.com/gpu", None)


BROKEN = {
    "old api": lambda d: d.update(apiVersion="ray.io/v1alpha1"),
    "wrong kind": lambda d: d.update(kind="RayCluster"),
    "no entrypoint": lambda d: d["spec"].pop("entrypoint"),
    "cluster kept": lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
    "no autoscaling": lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
    "other ray": lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"),
    "work on head": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
    "gpu floor": lambda d: _first_gpu_group(d).update(minReplicas=1),
    "no gpus": _drop_gpu_limits,
    "no toleration": lambda d: _first_gpu_group(d)["template"]["spec"].pop("tolerations"),
    "no shm": lambda d: _first_gpu_group(d)["template"]["spec"].pop("volumes"),
    "no cluster": lambda d: d["spec"].pop("rayClusterSpec"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_rayjob_is_caught(breakage):
    doc = load(RAYJOB)
    BROKEN[breakage](doc)
    assert problems(doc), f"{breakage}: not caught"


def test_raycluster_spec_is_the_rayjob_spec():
    """Two entry points, one cluster: edit both files together."""
    rc = load(RAYCLUSTER)
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert DNS_LABEL.match(rc["metadata"]["name"])
    assert cluster_spec_problems(rc["spec"]) == []
    assert rc["spec"] == load(RAYJOB)["spec"]["rayClusterSpec"]


# ------------------------------------------------------------------------- as the autoscaler reads it
@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_autoscaler_sees_cpu_head_and_gpu_groups(path):
    from tests.cluster.capacity import ClusterView

    doc = load(path)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    view = ClusterView.from_kuberay(spec)  # runs Ray's validate_config on the derived config
    assert view.head_resources["CPU"] == 0
    by_limit = {g["groupName"]: gpu_limit(g) for g in spec["workerGroupSpecs"]}
    for name, t in view.workers.items():
        assert t.resources.get("GPU", 0) == by_limit[name], name
        assert t.max_workers >= 1
    assert any(t.resources.get("GPU", 0) >= 8 for t in view.workers.values()), "an 8-GPU group for training"


# ------------------------------------------------------------------------------- entrypoint and image
def _dockerfile() -> tuple[str, str, list[str]]:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    copies = [src for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M) for src in line.split()[:-1]]
    return base, workdir, copies


def test_dockerfile_builds_on_the_tested_ray_and_copies_real_paths():
    base, workdir, copies = _dockerfile()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    assert workdir == "/home/ray/transformllm"
    for src in copies:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    text = DOCKERFILE.read_text()
    assert "constraints-gpu.txt" in text and "[ml,gpu" in text


def test_all_pods_run_one_image():
    for path in (RAYJOB, RAYCLUSTER):
        doc = load(path)
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert len({c["image"] for c in containers(spec)}) == 1, path.name


def _entrypoint() -> tuple[Path, list[str]]:
    from transformllm_ray.cli import build_parser

    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    args = build_parser().parse_intermixed_args(["run", *argv[3:]])  # jobs.pipeline defaults to `run`
    _, workdir, _ = _dockerfile()
    assert args.config.startswith(workdir + "/"), "the config must come from the repo baked into the image"
    config = REPO / args.config[len(workdir) + 1:]
    assert config.is_file(), f"the entrypoint runs {config.relative_to(REPO)}, which is not in the repo"
    return config, args.overrides


def test_entrypoint_config_loads_and_writes_to_shared_storage():
    config, overrides = _entrypoint()
    cfg = load_config(config, overrides)
    # Pods share no disk: every stage's output must be in object storage.
    assert cfg.output_dir.startswith(("s3://", "gs://")), cfg.output_dir


def test_entrypoint_config_names_its_devices():
    """The stages resolve `auto` from the resources alive at that moment (ray.cluster_resources()); on a
    cluster whose GPU group is scaled to zero that reads as "no GPU", and training would start on CPUs."""
    config, overrides = _entrypoint()
    cfg = load_config(config, overrides)
    assert cfg.train.use_gpu == "yes"
    assert cfg.convert.engine != "vllm" or cfg.convert.vllm.device == "cuda"


def test_entrypoint_config_fits_the_manifest_cluster():
    from tests.cluster.capacity import ClusterView, fit, stage_asks

    config, overrides = _entrypoint()
    view = ClusterView.from_kuberay(load(RAYJOB)["spec"]["rayClusterSpec"])
    for units in stage_asks(load_config(config, overrides)).values():
        fit(view, units)


# ----------------------------------------------------------------------------------------- secrets
def _secret_looking(name: str) -> bool:
    """WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY; not TOKENIZERS_PARALLELISM."""
    return any(part.rstrip("S") in SECRET_HINTS for part in name.upper().split("_"))


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_secrets_come_from_the_kubernetes_secret_only(path):
    doc = load(path)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    for c in containers(spec):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == [SECRET], f"{c['name']}: envFrom secretRef {SECRET} expected, got {refs}"
        for e in c.get("env", []):
            assert not (_secret_looking(e["name"]) and "value" in e), f"{c['name']}: literal {e['name']}"
    if doc["kind"] == "RayJob" and "runtimeEnvYAML" in doc["spec"]:
        env = (yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}).get("env_vars", {})
        assert not [k for k in env if _secret_looking(k)], "runtimeEnvYAML is stored in plain text"


TOKEN_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                         # Hugging Face token
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                            # AWS access key id
    re.compile(r"\b[0-9a-f]{40}\b"),                                # W&B API key (40 hex)
    re.compile(r"(?i)(api_key|token|secret|password)[\"']?\s*[:=]\s*[\"']?(?!\$)[A-Za-z0-9/+_-]{20,}"),
]


def _leaks(text: str) -> list[str]:
    return [m.group(0) for p in TOKEN_PATTERNS for m in p.finditer(text)]


def test_no_secret_values_in_cluster_files():
    files = [p for p in (REPO / "cluster").rglob("*") if p.is_file()]
    assert len(files) >= 6
    for p in files:
        assert _leaks(p.read_text()) == [], p


@pytest.mark.parametrize("leak", [
    "WANDB_API_KEY: 0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
    'env_vars: {"api_key": "sk-live-abcdefghijklmnopqrstuv"}',
])
def test_leak_scan_catches_literal_secrets(leak):
    assert _leaks(leak)


@pytest.mark.parametrize("clean", [
    'WANDB_API_KEY: "$WANDB_API_KEY"',
    '--from-literal=HF_TOKEN="$HF_TOKEN"',
    "TOKENIZERS_PARALLELISM: \"false\"",
])
def test_leak_scan_passes_references(clean):
    assert _leaks(clean) == []
