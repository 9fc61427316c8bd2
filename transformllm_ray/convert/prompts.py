"""The prompt database: versioned YAML files shipped in the package, one per (domain, version).

    db = load_prompts("legal", "v1")             # transformllm_ray/prompts/legal/v1.yaml
    fams = sample_families("3f2a...-0001", 2, db.family_names, seed=0)   # same id -> same families
    text = db.instruction("summary", passage=chunk_text, words="licence, warranty, party")

Nothing about prompts lives in code: instructions, the questions shown in the training text, the layout of
the training text, the word list for word-to-text and the regex engine's templates and connectives are all
in the YAML file. `db.version_tag` (`legal/v1`) is written on every output row. A file is frozen once data
was made with it; a change is a new version file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")
REQUIRED_FAMILY_KEYS = ("question", "instruction")


class PromptError(ValueError):
    """A missing or malformed prompt database file."""


@dataclass(frozen=True)
class Family:
    name: str
    question: str
    """Shown in the training text before the answer; may contain {words}."""
    instruction: str
    """User message sent to the model; contains {passage}, may contain {words}."""


@dataclass(frozen=True)
class PromptDB:
    domain: str
    version: str
    families: dict[str, Family]
    system: str | None
    task_format: str
    separator: str
    word_count: int
    vocabulary: tuple[str, ...]
    regex: dict[str, Any] = field(default_factory=dict)

    @property
    def version_tag(self) -> str:
        return f"{self.domain}/{self.version}"

    @property
    def family_names(self) -> list[str]:
        return list(self.families)

    def instruction(self, family: str, passage: str, words: str = "") -> str:
        return self.families[family].instruction.replace("{passage}", passage).replace("{words}", words)

    def question(self, family: str, words: str = "") -> str:
        return self.families[family].question.replace("{words}", words)

    def messages(self, family: str, passage: str, words: str = "") -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.instruction(family, passage, words)}]

    def pick_words(self, text: str) -> str:
        """Words for word-to-text: domain vocabulary found in the text (in text order), then its longest words."""
        found: list[str] = []
        vocab = set(self.vocabulary)
        words = _WORD.findall(text)
        for w in words:
            lw = w.lower()
            if lw in vocab and lw not in found:
                found.append(lw)
            if len(found) >= self.word_count:
                return ", ".join(found)
        for w in sorted({w.lower() for w in words if len(w) > 6}, key=lambda w: (-len(w), w)):
            if w not in found:
                found.append(w)
            if len(found) >= self.word_count:
                break
        return ", ".join(found)


def available() -> dict[str, list[str]]:
    """{domain: [versions]} of the files in the package."""
    out: dict[str, list[str]] = {}
    if os.path.isdir(PROMPTS_DIR):
        for d in sorted(os.listdir(PROMPTS_DIR)):
            p = os.path.join(PROMPTS_DIR, d)
            if os.path.isdir(p):
                out[d] = sorted(f[:-5] for f in os.listdir(p) if f.endswith(".yaml"))
    return out


def package_file(domain: str, version: str) -> str:
    path = os.path.join(PROMPTS_DIR, domain, f"{version}.yaml")
    if not os.path.isfile(path):
        raise PromptError(f"no prompt database {domain}/{version} (convert.domain / convert.prompt_version); "
                          f"available: {available()}")
    return path


def prompts_text(path: str | None, domain: str, version: str) -> str:
    """The YAML text of the prompt database a config names: the user's file `convert.prompts` (local or on
    object storage) or the package's `prompts/<domain>/<version>.yaml`. Resolved once on the driver and
    handed to the stages as text: nodes share no disk."""
    if path:
        from transformllm_ray.storage import read_bytes

        try:
            return read_bytes(path).decode("utf-8")
        except (OSError, FileNotFoundError) as e:
            raise PromptError(f"convert.prompts: cannot read {path}: {e}") from None
    with open(package_file(domain, version), encoding="utf-8") as f:
        return f.read()


def prompt_spec(path: str | None, domain: str, version: str) -> dict[str, str]:
    """What a stage is given to rebuild the prompt database anywhere: {"text": the YAML, "where": the package
    file's name, or "" for a user's file}. Resolved on the driver (`convert.prompts`, else domain/version)."""
    return {"text": prompts_text(path, domain, version),
            "where": "" if path else f"prompts/{domain}/{version}.yaml"}


def db_of(spec: dict[str, str]) -> PromptDB:
    return prompt_db(spec["text"], spec["where"])


def load_prompts(domain: str, version: str) -> PromptDB:
    """The package's prompt database (domain, version)."""
    return db_of(prompt_spec(None, domain, version))


@functools.lru_cache(maxsize=16)
def prompt_db(text: str, where: str = "") -> PromptDB:
    """Parse and check a prompt database's YAML text. A package file (`where` given) is tagged
    `<domain>/<version>`; a user's file `<domain>/<version>@<sha256 of its text, 12 hex>`: its content is its
    version, so an edited file can never pass for the one data was made with."""
    import yaml

    user = not where
    where = where or "convert.prompts"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PromptError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PromptError(f"{where}: a mapping with domain, version, families is expected")
    domain, version = str(data.get("domain") or ""), str(data.get("version") or "")
    if not domain or not version:
        raise PromptError(f"{where}: needs `domain` and `version`")
    if not user and where != f"prompts/{domain}/{version}.yaml":
        raise PromptError(f"{where}: domain/version inside the file ({domain}/{version}) do not match its path")
    fams = data.get("families") or {}
    if not isinstance(fams, dict) or not fams:
        raise PromptError(f"{where}: no families")
    families = {}
    for name, spec in fams.items():
        missing = [k for k in REQUIRED_FAMILY_KEYS if not isinstance(spec, dict) or not spec.get(k)]
        if missing:
            raise PromptError(f"{where}: family {name!r} lacks {missing}")
        if "{passage}" not in spec["instruction"]:
            raise PromptError(f"{where}: family {name!r}: instruction has no {{passage}}")
        unknown = set(re.findall(r"\{(\w+)\}", spec["instruction"] + spec["question"])) - {"passage", "words"}
        if unknown:
            raise PromptError(f"{where}: family {name!r}: unknown placeholders {sorted(unknown)} (known: "
                              "{passage}, {words})")
        if "{passage}" in spec["question"]:
            raise PromptError(f"{where}: family {name!r}: the question is shown after the passage; no {{passage}}")
        families[name] = Family(name, spec["question"], spec["instruction"])
    fmt = data.get("format") or {}
    task_format = fmt.get("task", "Question: {question}\nAnswer: {answer}")
    if "{question}" not in task_format or "{answer}" not in task_format:
        raise PromptError(f"{where}: format.task needs {{question}} and {{answer}}")
    words = data.get("words") or {}
    if user:
        version = f"{version}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return PromptDB(domain=domain, version=version, families=families, system=data.get("system"),
                    task_format=task_format, separator=fmt.get("separator", "\n\n"),
                    word_count=int(words.get("word_count", 3)),
                    vocabulary=tuple(w.lower() for w in words.get("vocabulary", [])), regex=data.get("regex") or {})


def chunk_rng(chunk_id: str, seed: int, purpose: str) -> random.Random:
    """A random generator that depends only on (chunk id, seed, purpose): the same on every machine/rerun."""
    h = hashlib.sha256(f"{purpose}:{seed}:{chunk_id}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def sample_families(chunk_id: str, n: int, families: list[str], seed: int = 0) -> list[str]:
    """`n` distinct task families for a chunk, drawn from its id (deterministic, uniform over families)."""
    if n > len(families):
        raise PromptError(f"convert.tasks_per_chunk={n} but the prompt database has only {len(families)} "
                          f"families {families}")
    return chunk_rng(chunk_id, seed, "families").sample(list(families), n)
