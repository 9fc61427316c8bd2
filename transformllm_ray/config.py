"""Typed, validated configuration: one source of truth for every stage.

A YAML file in `configs/` maps onto `Config` (nested pydantic models, a docstring under each field, strict
types, unknown keys refused). Each stage's section lives beside its code (`ingest/config.py`,
`convert/config.py`, ...; the shared base in sections.py); this module assembles them, with `ray` and the
top-level keys, and loads files. A file may start with `extends: other.yaml` (resolved relative to itself) and
then only changes a few fields; `configs/debug-local.yaml` is the embedded default that the others derive from.
The CLI adds dotted overrides (`train.lr=3e-4`), parsed as YAML scalars.

    from transformllm_ray.config import load_config
    cfg = load_config("configs/debug-local.yaml", ["train.max_steps=10"])

Every problem (unknown key, wrong type, missing value, bad combination) raises `ConfigError` with one line
that names the dotted key, before Ray or any heavy library starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from transformllm_ray.convert.config import ConvertConfig, QualityConfig, SamplingConfig, VllmConfig  # noqa: F401 - re-exported
from transformllm_ray.eval.config import EvalConfig
from transformllm_ray.ingest.config import IngestConfig, SplitConfig
from transformllm_ray.pack.config import PackConfig
from transformllm_ray.sections import BUILTIN_SMOLLM2, Section  # noqa: F401 - re-exported
from transformllm_ray.sources.config import GeneralConfig, InputConfig, SourceConfig  # noqa: F401 - re-exported
from transformllm_ray.train.config import TrainConfig, WandbConfig  # noqa: F401 - re-exported

STAGES = ("ingest", "convert", "pack", "train", "eval", "report")
"""Stages in pipeline order; `run` executes them in this order."""


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


# --------------------------------------------------------------------------------------------- ray
class RayConfig(Section):
    address: Optional[str] = None
    """Cluster to join; None = $RAY_ADDRESS if set, else start a local single-node Ray."""
    num_cpus: Optional[int] = None
    """Local mode only: CPUs Ray may use (None = all)."""
    dashboard: bool = True
    """Local mode only: start Ray's dashboard (http://127.0.0.1:8265, loopback only). Besides the progress of
    Ray Data and Train it serves the State API, which Ray Train 2.60's placement-group cleaner polls every
    second: without it the cleaner logs a warning each time (~260 lines in the demo's training) and cannot
    free a crashed run's resources. Costs ~1 s of start-up."""
    shared_storage: bool = False
    """The local paths `output_dir` and `train.storage_path` are one filesystem mounted on every node (NFS,
    `/mnt/cluster_storage`). Without it, a local path on a Ray cluster of several nodes is refused: their
    disks are their own, and each node would write a part of the output where the others cannot read it."""
    forward_env: list[str] = ["VLLM_*", "WANDB_*", "HF_*", "HUGGING_FACE_*", "TRANSFORMLLM_*"]
    """Environment variables (glob patterns) forwarded to Ray workers through the runtime env. Secrets travel
    this way and are never written to disk."""


# --------------------------------------------------------------------------------------------- root
class Config(Section):
    output_dir: str
    """Where every stage writes `<output_dir>/<stage>/` (local folder, or s3:// gs://)."""
    seed: int = 0
    """Global seed."""
    input: InputConfig
    """Raw domain corpus."""
    general: GeneralConfig = Field(default_factory=GeneralConfig)
    """Raw general text mixed into training (read by ingest like the domain corpus)."""
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    """Cleaning and chunking."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Held-out / validation assignment by document."""
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    """Rewriting into reading-comprehension text."""
    pack: PackConfig = Field(default_factory=PackConfig)
    """Tokenise, mix, pack."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Continued pre-training."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Perplexity before/after."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Cluster connection."""

    @model_validator(mode="after")
    def _absolute_local_paths(self) -> "Config":
        # Ray workers do not run in the driver's working directory (a relative output_dir made the training
        # workers write model/ and metrics where the driver never looked): local paths are resolved once,
        # here, against the directory of the process that loads the config. URIs are left alone.
        self.output_dir = local_abspath(self.output_dir)
        self.input.paths = [local_abspath(p) for p in self.input.paths]
        self.pack.domain_paths = [local_abspath(p) for p in self.pack.domain_paths]
        self.general.paths = [local_abspath(p) for p in self.general.paths]
        if self.train.storage_path:
            self.train.storage_path = local_abspath(self.train.storage_path)
        if self.train.resume not in ("auto", "never"):
            self.train.resume = local_abspath(self.train.resume)
        # Model and tokenizer names: local folders only (hub names and builtin: names stay as written).
        self.convert.model = local_model(self.convert.model)
        self.train.base_model = local_model(self.train.base_model)
        if self.ingest.tokenizer:
            self.ingest.tokenizer = local_model(self.ingest.tokenizer)
        if self.pack.tokenizer:
            self.pack.tokenizer = local_model(self.pack.tokenizer)
        return self

    # Resolved helpers (not config keys) ---------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        return join_uri(self.output_dir, stage)

    @property
    def ingest_tokenizer(self) -> str:
        return self.ingest.tokenizer or self.convert.model

    @property
    def pack_tokenizer(self) -> str:
        return self.pack.tokenizer or self.train.base_model


def local_abspath(path: str) -> str:
    """`path` made absolute if it is a local path (`~` expanded); URIs (s3://, gs://, file://...) and "" unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def local_model(name: str) -> str:
    """A model name made absolute when it is a local folder, as transformers decides: written as a path
    (`./m`, `~/m`, `/m`) or an existing folder. Hub names (`org/model`) and `builtin:` names unchanged."""
    if name.startswith(("~", ".", "/")) or os.path.isdir(name):
        return local_abspath(name)
    return name


def join_uri(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


# --------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`, a trap for learning rates) and
    refuses a key set twice in one mapping (PyYAML keeps the last silently: an edit lower in a long file
    would undo one above it without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} on line {line} (first set on line {seen[key]})",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, so `train.use_gpu=yes`
# arrived as True and was refused by a field whose values are "auto", "yes", "no"; a bool field still accepts
# "yes"/"no"/"on"/"off" (pydantic reads them).
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|" r"^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$|^[-+]?[0-9][0-9_]*\.[0-9_]*$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _deep_merge(_read_yaml(path.parent / parent, seen + (path,)), data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(data: dict, item: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (`1e-4`, `[a, b]`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: `{p}` is not a section")
        node = nxt
    node[parts[-1]] = value


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = f"{loc}: unknown key"
    elif kind == "missing":
        msg = f"{loc}: required value missing"
    elif kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return msg if ":" in msg else f"{loc}: {msg}"
    else:
        msg = f"{loc}: {err['msg']} (got {err.get('input')!r})"
    more = len(e.errors()) - 1
    return msg + (f" (+{more} more problem{'s' * (more > 1)})" if more else "")


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (following `extends`), apply dotted overrides, validate. Raises ConfigError."""
    data = _read_yaml(Path(path))
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data)


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field: the reference printed by `transformllm keys`."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
            continue
        default = "(required)" if field.is_required() else json.dumps(field.default, default=str)
        rows.append((key, default, " ".join((field.description or "").split())))
    return rows
