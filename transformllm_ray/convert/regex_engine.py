"""`convert.engine: regex`: the AdaptLLM baseline. Reading-comprehension tasks mined from the raw text with
rules and templates, no LLM, CPU only.

    transformllm convert --config configs/debug-local.yaml convert.engine=regex

Our own rules, written from the method's description (Cheng et al., ICLR 2024); the templates, connectives and
domain vocabulary are in the prompt database (`regex:` and `words:` of prompts/<domain>/<version>.yaml):
- summary_title: the document's title (metadata `title`/`name`/`case_name`/`short_name`, or a short first
  line of the document's first chunk) is the answer to "What is a suitable title ...".
- word_to_text: a sentence holding >= 2 domain words answers "Write a sentence ... using these words".
- inference: two consecutive sentences where the second opens with a connective ("Therefore,", "However,",
  "Moreover,") form a premise/hypothesis pair labelled entailment / contradiction / neutral.
- cause_effect: "<effect> because / due to <cause>" and "<cause>, so <effect>" give "What is the reason
  that ...?" and "What follows from the fact that ...?" with the other half as the answer.
- completion: the first half of a sentence is the question, its second half the answer.
At most `convert.tasks_per_chunk` tasks per chunk, drawn deterministically from its id, one per kind first.
A chunk with no minable task is rejected (`no_tasks`).
"""

from __future__ import annotations

import collections
import json
import re
import time
from typing import Any

from transformllm_ray.config import Config
from transformllm_ray.console import progress, say
from transformllm_ray.convert.format import training_text
from transformllm_ray.convert.ledger import EXCERPT, STAGE, Ledger
from transformllm_ray.convert.prompts import PromptDB, chunk_rng, db_of
from transformllm_ray.dataops import BatchUDF
from transformllm_ray.resources import convert_pools
from transformllm_ray.schema import make_reject

KINDS = ("summary_title", "word_to_text", "inference", "cause_effect", "completion")
_SENT_END = re.compile(r"(?<=[.!?;])\s+(?=[\"'(]?[A-Z0-9])|\n{2,}")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
TITLE_KEYS = ("title", "case_name", "name", "short_name")


def sentences(text: str) -> list[str]:
    """Sentences (and paragraph-level lines) of a chunk, whitespace collapsed, 4-80 words."""
    out = []
    for s in _SENT_END.split(text):
        s = " ".join(s.split())
        n = len(s.split())
        if 4 <= n <= 80:
            out.append(s)
    return out


def _clause(s: str) -> str:
    """A sentence part as a clause: trailing punctuation off, first letter lower-cased unless an acronym."""
    s = s.strip().strip(",;:").rstrip(".!?;:").strip()
    if len(s) > 1 and s[0].isupper() and not s[1].isupper():
        s = s[0].lower() + s[1:]
    return s


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def find_title(text: str, metadata: dict, position: int) -> str | None:
    for k in TITLE_KEYS:
        v = metadata.get(k)
        if isinstance(v, str) and 2 <= len(v.strip()) <= 200:
            return " ".join(v.split())
    if position == 0:
        first = text.strip().split("\n", 1)[0].strip()
        if 1 <= len(first.split()) <= 12 and not first.endswith((".", ",", ";", ":")) and _WORD.search(first):
            return first
    return None


def mine_candidates(text: str, metadata: dict, position: int, db: PromptDB) -> dict[str, list[dict]]:
    """Every task the rules find in one chunk, by kind: {kind: [{question, answer, ...}]}."""
    rx = db.regex
    sents = sentences(text)
    found: dict[str, list[dict]] = {k: [] for k in KINDS}

    title = find_title(text, metadata, position)
    if title:
        found["summary_title"].append({"question": rx["summary_title"]["question"], "answer": title})

    vocab = set(db.vocabulary)
    for s in sents:
        words = []
        for w in _WORD.findall(s):
            lw = w.lower()
            if lw in vocab and lw not in words:
                words.append(lw)
        if len(words) >= 2 and len(s.split()) >= 8:
            ws = ", ".join(words[: db.word_count])
            found["word_to_text"].append({"question": rx["word_to_text"]["question"].replace("{words}", ws),
                                          "answer": s})

    inf = rx["inference"]
    for prev, cur in zip(sents, sents[1:]):
        for label, conns in inf["connectives"].items():
            m = next((c for c in conns if re.match(rf"{re.escape(c)}\b,?\s+", cur, re.I)), None)
            if m:
                hyp = _cap(re.sub(rf"^{re.escape(m)}\b,?\s+", "", cur, flags=re.I))
                q = inf["question"].replace("{premise}", prev).replace("{hypothesis}", hyp)
                found["inference"].append({"question": q, "answer": inf["answers"][label], "label": label})
                break

    ce = rx["cause_effect"]
    for s in sents:
        low = s.lower()
        for marker in ce["cause_markers"]:
            i = low.find(f" {marker} ")
            if i > 0:
                effect, cause = s[:i], s[i + len(marker) + 2:]
                if len(effect.split()) >= 3 and len(cause.split()) >= 3:
                    found["cause_effect"].append({
                        "question": ce["question_cause"].replace("{effect}", _clause(effect)),
                        "answer": _cap(_clause(cause)) + "."})
                break
        else:
            for marker in ce["effect_markers"]:
                i = low.find(f"{marker} ")
                if i > 0:
                    cause, effect = s[:i], s[i + len(marker) + 1:]
                    if len(effect.split()) >= 3 and len(cause.split()) >= 3:
                        found["cause_effect"].append({
                            "question": ce["question_effect"].replace("{cause}", _clause(cause)),
                            "answer": _cap(_clause(effect)) + "."})
                    break

    for s in sents:
        words = s.split()
        if 12 <= len(words) <= 60:
            half = len(words) // 2
            found["completion"].append({"question": rx["completion"]["question"].replace(
                "{prefix}", " ".join(words[:half])), "answer": " ".join(words[half:])})
    return found


def select_tasks(chunk_id: str, found: dict[str, list[dict]], n: int, seed: int) -> list[tuple[str, dict]]:
    """Up to n tasks: kinds in a per-chunk random order, one task per kind first, then more of each."""
    rng = chunk_rng(chunk_id, seed, "regex")
    kinds = [k for k in KINDS if found[k]]
    rng.shuffle(kinds)
    pools = {k: rng.sample(found[k], len(found[k])) for k in kinds}
    out: list[tuple[str, dict]] = []
    while len(out) < n and any(pools.values()):
        for k in kinds:
            if pools[k] and len(out) < n:
                out.append((k, pools[k].pop()))
    return out


class RegexConverter(BatchUDF):
    """Ray Data stage (engine: regex): chunk rows in, one result row per chunk out (status ok or no_tasks).

    Input columns: id, doc_id, split, text, position, metadata. Output columns: id, doc_id, split, text,
    raw_output, task_families, status, detail, excerpt, token counts, finish_reason, attempts, sampling,
    gen_seconds (RegexCommitStage turns them into converted/ and rejects/ rows).
    """

    input_columns = ("id", "doc_id", "split", "text", "position", "metadata")

    def __init__(self, prompts: dict[str, str], tasks_per_chunk: int, seed: int):
        self.db = db_of(prompts)
        self.n = tasks_per_chunk
        self.seed = seed

    def convert(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            meta = json.loads(row.get("metadata") or "{}")
        except ValueError:
            meta = {}
        found = mine_candidates(row["text"], meta if isinstance(meta, dict) else {}, int(row["position"]), self.db)
        tasks = select_tasks(row["id"], found, self.n, self.seed)
        ok = bool(tasks)
        return {
            "id": row["id"], "doc_id": row["doc_id"], "split": row["split"],
            "text": training_text(row["text"], [(t["question"], t["answer"]) for _, t in tasks], self.db) if ok else "",
            "raw_output": json.dumps([{"kind": k, **t} for k, t in tasks], ensure_ascii=False),
            "task_families": ",".join(k for k, _ in tasks),
            "status": "ok" if ok else "no_tasks",
            "detail": "" if ok else "no title, domain-word sentence, connective, cause/effect or long sentence",
            "excerpt": row["text"][:EXCERPT],
            "input_tokens": 0, "output_tokens": 0, "finish_reason": ",".join("rule" for _ in tasks),
            "attempts": 1, "prompt_truncated": False, "sampling": "{}",
            "gen_seconds": time.perf_counter() - t0,
        }

    def map(self, batch: dict[str, Any]) -> dict[str, list]:
        n = len(batch["id"])
        rows = [self.convert({c: batch[c][i] for c in self.input_columns}) for i in range(n)]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


# ------------------------------------------------------------------------------------------- the stage
class RegexCommitStage(BatchUDF):
    """Ray Data stage (engine regex): a batch of chunk rows in, converted and committed by this worker as one
    ledger commit (`convert.rows_per_file` rows); one narrow row per chunk out (id, status, commit key).

    The converted text never travels to the driver: it only counts the narrow rows. A retried task converts
    the same rows into the same commit key and overwrites the same files; a rerun after a kill gets only
    uncommitted ids (anti-join), so commits never share an id. Input columns: those of RegexConverter."""

    input_columns = ("id", "doc_id", "split", "text", "position", "metadata")

    def __init__(self, out_dir: str, fingerprint: str, prompts: dict[str, str], tasks_per_chunk: int,
                 seed: int):
        self.conv = RegexConverter(prompts, tasks_per_chunk, seed)
        self.ledger = Ledger(out_dir, fingerprint)
        tag = self.conv.db.version_tag
        self.base = {"engine": "regex", "model": "regex", "model_revision": tag, "prompt_version": tag}

    def map(self, batch: dict[str, Any]) -> dict[str, list]:
        t0 = time.time()
        res = self.conv(batch)
        n = len(batch["id"])
        converted, rejects = [], []
        for i in range(n):
            r = {k: v[i] for k, v in res.items()}
            if r["status"] == "ok":
                converted.append({
                    "id": r["id"], "doc_id": r["doc_id"], "split": r["split"], "text": r["text"],
                    "raw_output": r["raw_output"], "task_families": r["task_families"], **self.base,
                    "sampling": "{}", "response_ids": "", "input_tokens": 0, "output_tokens": 0, "finish_reason": r["finish_reason"],
                    "status": "ok", "attempts": 1, "seconds": round(r["gen_seconds"], 4)})
            else:
                rejects.append(make_reject(STAGE, r["id"], r["status"], r["detail"], r["excerpt"], EXCERPT).__dict__)
        key = self.ledger.commit(converted, rejects, [], {"attempt": 1, "seconds": round(time.time() - t0, 3),
                                                          "input_tokens": 0, "output_tokens": 0})
        return {"id": list(res["id"]), "status": list(res["status"]), "commit": [key] * n}


def regex_pass(cfg: Config, ds, todo: int, ledger: Ledger, prompts: dict[str, str]) -> dict[str, Any]:
    c = cfg.convert
    ds = ds.map_batches(RegexCommitStage, fn_constructor_kwargs={
        "out_dir": ledger.out, "fingerprint": ledger.fingerprint, "prompts": prompts,
        "tasks_per_chunk": c.tasks_per_chunk, "seed": cfg.seed},
        **convert_pools(cfg, "cpu")["regex"].actor_pool(), batch_size=max(1, c.rows_per_file))
    t0 = time.time()
    counts: collections.Counter = collections.Counter()
    commits = set()
    with progress(STAGE, todo, "chunks") as bar:
        for batch in ds.select_columns(["status", "commit"]).iter_batches(batch_format="pyarrow", batch_size=None):
            st = batch["status"].to_pylist()
            bar.update(len(st))
            counts["converted"] += sum(1 for x in st if x == "ok")
            counts["reject"] += sum(1 for x in st if x != "ok")
            commits.update(batch["commit"].to_pylist())
    say(f"[convert] regex: {counts['converted']} chunks converted, {counts['reject']} rejected, "
        f"{len(commits)} commits")
    return {"seconds": time.time() - t0, "commits": len(commits), "input_tokens": 0, "output_tokens": 0,
            **{f"chunks_{k}": v for k, v in counts.items()}}
