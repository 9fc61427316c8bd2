"""`convert.engine: openai`: task rows -> gated task answers from any OpenAI-compatible chat endpoint.

    ds = expand_tasks(...)                              # the vLLM engine's task rows (vllm_engine.py)
    out = endpoint_pipeline(ds, cfg)                    # OpenAIChat clients -> one gated row per task
    for row in out.iter_rows(): ...                     # same columns as the vLLM pipeline, + response_id

A `vllm serve` or SGLang server, or a hosted API: the same prompt database, quality gate, exactly-once ledger
and provenance as the in-cluster vLLM engine (the driver side, assemble.py, is shared). `OpenAIChat` is a
Ray Data callable class, a fixed pool of `openai.num_clients` actors; each sends the requests of its batch
with at most `openai.max_concurrency` in flight and paces them to its share of `openai.requests_per_s`.

Why not ray.data.llm's HTTP request processor (Ray 2.60, `HttpRequestProcessorConfig`): it awaits a batch's
requests one after another (no concurrency inside a batch), does not retry 500, and when a request exhausts
its retries it raises, failing the whole batch (no per-row isolation) with the request payload in the
message. The `openai` client does what we need: retries on 429/408/409/5xx, timeouts and dropped connections
with exponential backoff and jitter, honouring Retry-After, and typed errors we can turn into one
`engine_error` row. The key: read on the worker from the environment variable `openai.api_key_env` names;
never in a config, a fingerprint, an actor's arguments, a row, a log line or a report (errors are
redacted of it before they are recorded).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

from transformllm_ray.config import Config
from transformllm_ray.convert.config import QualityConfig
from transformllm_ray.convert.prompts import db_of
from transformllm_ray.convert.quality import check_output
from transformllm_ray.convert.vllm_engine import request_seed
from transformllm_ray.dataops import BatchUDF

EXTRA_SAMPLING = ("repetition_penalty", "ignore_eos")
"""Sampling fields outside the OpenAI schema, sent in the request body's extras only when they differ from
their defaults (vLLM and SGLang servers read them; a hosted API may refuse them)."""


def endpoint_label(base_url: str) -> str:
    """scheme://host[:port]/path of the endpoint: no user, password or query string (which can hold keys)."""
    u = urlsplit(base_url)
    host = u.hostname or ""
    return f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}{u.path.rstrip('/')}"


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class OpenAIChat(BatchUDF):
    """Ray Data stage: task rows in, the same rows answered and gated out (vllm_engine.OUT_COLUMNS plus
    `response_id` and `served_model`). One request per row; a request that fails after the client's retries
    is an `engine_error` row naming the error, and the batch goes on."""

    input_columns = ("chunk_id", "chunk_text", "task_index", "family", "words", "attempt", "sampling")

    def __init__(self, base_url: str, model: str, api_key_env: str | None, prompts: dict[str, str], quality: dict,
                 max_concurrency: int, rate_per_s: float | None, max_retries: int, timeout_s: float):
        import asyncio

        import openai

        self.key = os.environ.get(api_key_env) if api_key_env else None
        self.model, self.db = model, db_of(prompts)
        self.quality = QualityConfig(**quality)
        self.max_concurrency, self.interval = max_concurrency, (1.0 / rate_per_s if rate_per_s else 0.0)
        self.loop = asyncio.new_event_loop()  # one loop per actor: the client's connection pool lives on it
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=self.key or "EMPTY", max_retries=max_retries,
                                         timeout=timeout_s)
        self.next_start = 0.0

    async def _paced(self, lock) -> None:
        """Rate limit: request starts at least `interval` apart (per actor)."""
        import asyncio

        if not self.interval:
            return
        async with lock:
            now = self.loop.time()
            wait = self.next_start - now
            self.next_start = max(now, self.next_start) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)

    async def _one(self, row: dict[str, Any], sem, lock) -> dict[str, Any]:
        import openai

        s = json.loads(row["sampling"])
        body: dict[str, Any] = {"model": self.model, "messages": self.db.messages(row["family"], row["chunk_text"],
                                                                                  row["words"]),
                                "temperature": s["temperature"], "top_p": s["top_p"], "max_tokens": s["max_tokens"]}
        if s["temperature"] > 0:  # a per-request seed, as the vLLM engine's: reproducible where servers honour it
            body["seed"] = request_seed(s["seed"], row["chunk_id"], int(row["task_index"]), int(row["attempt"]))
        extra = {k: s[k] for k in EXTRA_SAMPLING if s.get(k) not in (None, 1.0, False)}
        if extra:
            body["extra_body"] = extra
        async with sem:
            await self._paced(lock)
            t0 = self.loop.time()
            try:
                resp = await self.client.chat.completions.create(**body)
            except openai.APIStatusError as e:
                return self._error(f"HTTP {e.status_code}: {e.message}")
            except openai.APIError as e:  # timeouts, dropped connections, bad responses: after the retries
                return self._error(f"{type(e).__name__}: {e}")
            seconds = self.loop.time() - t0
        choice = resp.choices[0] if resp.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        fin = (choice.finish_reason or "stop") if choice is not None else "error"
        fin = fin if fin in ("stop", "length") else "stop"  # e.g. content_filter: the gate judges the text
        reason, detail = check_output(text, fin, self.quality)
        usage = resp.usage
        return {"output": text, "input_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                "output_tokens": int(getattr(usage, "completion_tokens", 0) or 0), "finish_reason": fin,
                "status": reason or "ok", "detail": detail, "llm_seconds": seconds,
                "response_id": str(resp.id or ""), "served_model": str(resp.model or self.model)}

    def _error(self, message: str) -> dict[str, Any]:
        return {"output": "", "input_tokens": 0, "output_tokens": 0, "finish_reason": "error",
                "status": "engine_error", "detail": redact(message, self.key)[:500], "llm_seconds": 0.0,
                "response_id": "", "served_model": self.model}

    async def _all(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import asyncio

        sem, lock = asyncio.Semaphore(self.max_concurrency), asyncio.Lock()
        return await asyncio.gather(*(self._one(r, sem, lock) for r in rows))

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        from transformllm_ray.convert.vllm_engine import OUT_COLUMNS

        n = len(batch["chunk_id"])
        rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()} for i in range(n)]
        answers = self.loop.run_until_complete(self._all(rows))
        out: dict[str, list] = {c: [] for c in (*OUT_COLUMNS, "served_model")}
        for row, ans in zip(rows, answers):
            full = {**row, "prompt_truncated": False, **ans}
            for c in out:
                out[c].append(full[c])
        return out


def endpoint_pipeline(ds, cfg: Config, prompts: dict[str, str]):
    """Task rows -> gated task rows through the endpoint (lazy Ray Data dataset)."""
    from transformllm_ray.resources import convert_pools

    o = cfg.convert.openai
    # Blocks of one client batch each: a small input otherwise arrives as one block, whose answers would all
    # reach the driver (and be committed) only when the last of them is in.
    ds = ds.repartition(target_num_rows_per_block=o.batch_size)
    return ds.map_batches(
        OpenAIChat,
        fn_constructor_kwargs={
            "base_url": o.base_url, "model": o.model or cfg.convert.model, "api_key_env": o.api_key_env,
            "prompts": prompts, "quality": cfg.convert.quality.model_dump(), "max_concurrency": o.max_concurrency,
            "rate_per_s": o.requests_per_s / o.num_clients if o.requests_per_s else None,
            "max_retries": o.max_retries, "timeout_s": o.timeout_s},
        # A dead client actor (node lost) is restarted and its batch sent again (Ray Data's default for actor
        # pools: max_restarts=-1, max_task_retries=-1); the ledger keeps every chunk once.
        batch_size=o.batch_size, batch_format="numpy", **convert_pools(cfg, "cpu")["client"].actor_pool(),
    )
