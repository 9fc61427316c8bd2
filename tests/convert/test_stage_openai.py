"""Convert through an OpenAI-compatible endpoint (`convert.engine: openai`): a real `vllm serve` of the tiny
model on loopback, behind a proxy that injects 429s, 500s, timeouts and dropped connections. The client
stage alone (key sent, missing key, rate limit), then the whole stage as a CLI run killed -9 mid-stage and
rerun: every chunk exactly once, a request no retry can save rejected on its own, provenance from the
server, and the key nowhere in what the runs wrote or printed."""

from __future__ import annotations

import glob
import json
import os
import secrets
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import start_cli_and_kill, write_config
from tests.llmserver import FaultProxy, VllmServer
from transformllm_ray.config import load_config
from transformllm_ray.convert.prompts import prompt_spec
from transformllm_ray.stage import run_stage
from transformllm_ray.storage import list_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY_ENV = "TLR_TEST_ENDPOINT_KEY"
KEY = "sk-test-" + secrets.token_hex(16)
SERVED = "tiny-served"
LENIENT = {"min_chars": 1, "reject_truncated": False, "max_repeated_ngram_fraction": 1.0, "min_english_fraction": 0.0}


@pytest.fixture(scope="module")
def server(tiny_model):
    s = VllmServer(tiny_model, SERVED, KEY).start()
    yield s
    s.stop()


def _client(base_url, key_env=KEY_ENV, **kw):
    from transformllm_ray.convert.openai_engine import OpenAIChat

    args = {"base_url": base_url, "model": SERVED, "api_key_env": key_env, "prompts": prompt_spec(None, "legal", "v1"),
            "quality": LENIENT, "max_concurrency": 4, "rate_per_s": None, "max_retries": 2, "timeout_s": 30.0}
    return OpenAIChat(**{**args, **kw})


def _tasks(n):
    import numpy as np

    sampling = json.dumps({"temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "repetition_penalty": 1.0, "seed": 0,
                           "ignore_eos": False})
    rows = {"chunk_id": [f"c{i}" for i in range(n)], "doc_id": ["d"] * n, "split": ["train"] * n,
            "chunk_text": ["The licensee shall pay the fee within thirty days."] * n, "n_tasks": [1] * n,
            "task_index": [0] * n, "family": ["summary"] * n, "words": [""] * n, "attempt": [1] * n,
            "sampling": [sampling] * n, "max_tokens": [8] * n, "prev": [""] * n}
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def test_the_client_sends_the_key_isolates_errors_and_keeps_the_rate(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = _client(server.url + "/v1")(_tasks(4))
    assert out["status"] != ["engine_error"] * 4 and all(r.startswith("chatcmpl-") for r in out["response_id"])
    assert set(out["served_model"]) == {SERVED} and all(t > 0 for t in out["input_tokens"])
    # No key (the variable unset): the server refuses each request; each row says so, none raises.
    monkeypatch.delenv(KEY_ENV)
    out = _client(server.url + "/v1")(_tasks(2))
    assert out["status"] == ["engine_error"] * 2 and all(d.startswith("HTTP 401") for d in out["detail"])
    # 6 requests at 4/s: starts at least 0.25 s apart.
    monkeypatch.setenv(KEY_ENV, KEY)
    client = _client(server.url + "/v1", rate_per_s=4.0)
    t0 = time.time()
    out = client(_tasks(6))
    assert time.time() - t0 >= 1.25 and "engine_error" not in out["status"]


def _config(tmp_path, base_url, max_chunks, tokenizer, openai=None, **convert):
    # convert.model names the tokenizer that bounds chunks (ingest.tokenizer unset); openai.model is served.
    conv = {"engine": "openai", "model": tokenizer, "max_chunks": max_chunks, "tasks_per_chunk": 2,
            "rows_per_file": 2, "sampling": {"max_tokens": 24, "temperature": 1.0}, "quality": LENIENT,
            "openai": {"base_url": base_url, "model": SERVED, "api_key_env": KEY_ENV, "max_concurrency": 4,
                       "batch_size": 4, "max_retries": 4, "timeout_s": 4.0, **(openai or {})}, **convert}
    return write_config(tmp_path, input={"builtin": "licensedcode", "max_files": 60}, ingest={"chunk_tokens": 200},
                        convert=conv)


def test_endpoint_through_faults_killed_and_rerun_holds_every_chunk_once(ray_local, server, tmp_path, monkeypatch,
                                                                         tiny_model):
    N = 16  # chunks: 32 requests, enough to meet every fault, a kill and a rerun
    monkeypatch.setenv(KEY_ENV, KEY)  # the CLI runs (and their Ray workers) inherit it; nothing else carries it
    # Ingest first, to name one chunk whose requests always fail (a marker only its text holds).
    path = _config(tmp_path, "http://unused/v1", N, tiny_model)
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    chunks = pq.read_table(f"{cfg.output_dir}/ingest/chunks").to_pylist()
    selected = sorted((c for c in chunks if c["split"] != "heldout" and c["kind"] == "domain"), key=lambda c: c["id"])
    selected = selected[:N]
    doomed = next(c for c in selected[4:] if c["text"][:80].isascii()
                  and sum(c["text"][:80] in o["text"] for o in chunks) == 1)
    proxy = FaultProxy(server.url, ["ok", "429", "ok", "ok", "500", "ok", "hang", "ok", "drop", "ok", "ok"],
                       hang_s=6.0, fail_always=(json.dumps(doomed["text"][:80])[1:-1],)).start()
    try:
        path = _config(tmp_path, proxy.url + "/v1", N, tiny_model)
        cfg = load_config(path)
        commits = f"{cfg.output_dir}/convert/_commits"
        start_cli_and_kill(["convert", "--config", path, "ray.num_cpus=3"],
                           lambda: len(list_files(commits, ".json")) >= 2, timeout=300)
        done_before = len(list_files(commits, ".json"))
        assert not os.path.exists(f"{cfg.output_dir}/convert/stats.json") and 2 <= done_before < N // 2
        env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
        rerun = subprocess.run([sys.executable, "-m", "transformllm_ray.cli", "convert", "--config", path,
                                "ray.num_cpus=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    finally:
        proxy.stop()
    stats = json.load(open(f"{cfg.output_dir}/convert/stats.json"))
    conv = pq.read_table(f"{cfg.output_dir}/convert/converted").to_pylist()
    rej = pq.read_table(f"{cfg.output_dir}/convert/rejects").to_pylist()
    ids = [r["id"] for r in conv] + [r["ref"] for r in rej]
    assert sorted(ids) == sorted(c["id"] for c in selected) and stats["rows_in"] == N  # each once
    assert stats["resumed_done"] == 2 * done_before
    # Every injected fault was met and retried past; only the doomed chunk failed, naming the error.
    assert {"429", "500", "hang", "drop", "fail_always"} <= set(proxy.served), proxy.served
    assert [(r["ref"], r["reason"]) for r in rej if r["reason"] == "engine_error"] == [(doomed["id"], "engine_error")]
    assert "HTTP 500" in next(r["detail"] for r in rej if r["ref"] == doomed["id"])
    # Provenance from the server: its model name and a response id per task; the endpoint, not the key.
    for r in conv:
        assert r["engine"] == "openai" and r["model"] == SERVED and r["model_revision"] == proxy.url + "/v1"
        rids = json.loads(r["response_ids"])
        assert len(rids) == 2 and all(x.startswith("chatcmpl-") for x in rids)
    assert stats["engine"] == "openai" and stats["output_tokens"] > 0
    # The key was sent, and is in nothing the runs wrote or printed.
    assert f"Bearer {KEY}" in proxy.authorizations
    for root, _, files in os.walk(cfg.output_dir):
        for f in files:
            assert KEY.encode() not in open(os.path.join(root, f), "rb").read(), os.path.join(root, f)
    assert KEY not in rerun.stdout + rerun.stderr


def test_a_budget_stops_cleanly_and_a_higher_one_continues(ray_local, server, tmp_path, tiny_model):
    """convert.max_cost: the run stops after the commit that reaches it (nothing half-done, no stats.json); a
    rerun with the same budget starts no engine; a higher one converts the rest. The cost is what the
    committed tokens cost at the configured prices."""
    from transformllm_ray.convert.assemble import BudgetReached

    # The workers of this test's Ray lack the key: a gateway in front of the server adds it.
    proxy = FaultProxy(server.url, ["ok"], authorization=f"Bearer {KEY}").start()
    prices = {"input_per_million": 1000.0, "output_per_million": 2000.0, "currency": "EUR"}

    def config(max_cost):
        return load_config(_config(tmp_path, proxy.url + "/v1", 8, tiny_model, openai={"api_key_env": None},
                                   cost=prices, max_cost=max_cost))

    try:
        cfg = config(0.05)  # a task's prompt alone costs more: the first commit passes it
        run_stage(cfg, "ingest")
        with pytest.raises(BudgetReached, match="EUR spent of 0.0500 EUR; 2 chunks committed"):
            run_stage(cfg, "convert")
        assert not os.path.exists(f"{cfg.output_dir}/convert/stats.json")
        with pytest.raises(BudgetReached, match="2 chunks committed"):
            run_stage(cfg, "convert")
        stats = run_stage(config(1000.0), "convert")
    finally:
        proxy.stop()
    assert stats["resumed_done"] == 2 and stats["rows_in"] == 8 == stats["rows_out"] + stats["rows_rejected"]
    expected = (stats["input_tokens"] * 1000.0 + stats["output_tokens"] * 2000.0) / 1e6
    assert stats["input_tokens"] > 0 and stats["cost"]["total"] == pytest.approx(expected, rel=1e-6)
    assert stats["cost"]["currency"] == "EUR" and stats["cost"]["max_cost"] == 1000.0
    # The dataset card: a Hub config pointing at the Parquet, and the figures of stats.json.
    card = open(f"{cfg.output_dir}/convert/README.md").read()
    front = yaml.safe_load(card.split("---")[1])
    files = front["configs"][0]["data_files"][0]["path"]
    assert pq.ParquetDataset(glob.glob(f"{cfg.output_dir}/convert/{files}")).read().num_rows == stats["rows_out"]
    assert f"| rows converted | {stats['rows_out']} |" in card and f"| model | {SERVED} |" in card
    assert f"{stats['cost']['total']:,.4f} EUR" in card and "licensedcode-data" in card
