"""The prompt database: shipped YAML files load, every family is complete, sampling is deterministic."""

from __future__ import annotations

import collections
import hashlib
import os

import pytest
import yaml

from tests.helpers import write_config
from transformllm_ray.config import ConfigError, load_config
from transformllm_ray.convert.format import training_text
from transformllm_ray.convert.prompts import (PROMPTS_DIR, PromptError, available, db_of, load_prompts, prompt_spec,
                                              sample_families)
from transformllm_ray.stage import stage_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_FAMILIES = {"summary", "explanation", "inference", "questions", "word_to_text", "completion"}


def test_legal_v1_is_shipped_and_complete():
    assert "v1" in available()["legal"]
    db = load_prompts("legal", "v1")
    assert db.version_tag == "legal/v1"
    assert set(db.family_names) == PAPER_FAMILIES
    for fam in db.family_names:
        text = db.instruction(fam, passage="THE PASSAGE", words="licence, warranty")
        assert "THE PASSAGE" in text and "{" not in text, fam
        # The passage comes first, so the tasks of one chunk share a prompt prefix (vLLM prefix cache).
        assert text.index("THE PASSAGE") < len(text) // 2, fam
        assert db.question(fam, words="a, b") and "{" not in db.question(fam, words="a, b")
    # The regex engine's templates live in the same file.
    assert {"summary_title", "word_to_text", "inference", "cause_effect", "completion"} <= set(db.regex)


def test_every_shipped_file_loads_and_matches_its_path():
    for domain, versions in available().items():
        for v in versions:
            assert load_prompts(domain, v).version_tag == f"{domain}/{v}"


def test_unknown_version_and_broken_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(PromptError, match="no prompt database legal/v999"):
        load_prompts("legal", "v999")


def _user_file(tmp_path, edit=None, name="mine.yaml"):
    """A user's prompt database: a copy of legal/v1 as another domain, edited by `edit(data)`."""
    data = yaml.safe_load(open(os.path.join(PROMPTS_DIR, "legal", "v1.yaml")))
    data["domain"], data["version"] = "contracts", "draft"
    if edit:
        edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_users_prompt_file_is_checked_when_the_config_loads(tmp_path):
    def load(path, **convert):
        return load_config(write_config(tmp_path, convert={"engine": "regex", "prompts": path, **convert}))

    def no_passage(d):
        d["families"]["summary"]["instruction"] = "Summarize."

    def typo(d):
        d["families"]["summary"]["instruction"] += " {pasage}"

    with pytest.raises(ConfigError, match="convert.prompts: family 'summary': instruction has no \\{passage\\}"):
        load(_user_file(tmp_path, no_passage))
    with pytest.raises(ConfigError, match="unknown placeholders \\['pasage'\\]"):
        load(_user_file(tmp_path, typo))
    with pytest.raises(ConfigError, match="convert.tasks_per_chunk: 9 but the prompt database contracts/draft@"):
        load(_user_file(tmp_path), tasks_per_chunk=9)
    with pytest.raises(ConfigError, match="convert.prompts: cannot read"):
        load(str(tmp_path / "missing.yaml"))
    # Its content is its version: an edit changes the tag rows carry and the stage fingerprint.
    path = _user_file(tmp_path)
    db = db_of(prompt_spec(path, "legal", "v1"))
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
    assert db.domain == "contracts" and db.version_tag == f"contracts/draft@{sha}"
    before = stage_fingerprint(load(path), "convert")
    _user_file(tmp_path, lambda d: d["families"]["summary"].update(question="Summarise the contract above."))
    assert stage_fingerprint(load(path), "convert") != before


def test_the_shipped_contracts_example_loads():
    cfg = load_config(os.path.join(REPO, "configs", "debug-local.yaml"),
                      [f"convert.prompts={os.path.join(REPO, 'configs', 'prompts', 'contracts.yaml')}"])
    db = db_of(prompt_spec(cfg.convert.prompts, cfg.convert.domain, cfg.convert.prompt_version))
    assert db.domain == "contracts" and len(db.families) >= cfg.convert.tasks_per_chunk
    assert set(db.families) == set(load_prompts("legal", "v1").families)  # every task type of the method


def test_family_sampling_is_deterministic_and_covers_all_families():
    fams = load_prompts("legal", "v1").family_names
    ids = [f"{i:020x}-{j:04d}" for i in range(200) for j in range(2)]
    first = {cid: sample_families(cid, 2, fams) for cid in ids}
    assert first == {cid: sample_families(cid, 2, fams) for cid in ids}  # same id -> same tasks
    assert all(len(set(v)) == 2 for v in first.values())                # distinct families per chunk
    counts = collections.Counter(f for v in first.values() for f in v)
    assert set(counts) == set(fams) and min(counts.values()) > 0.5 * max(counts.values())  # ~uniform
    assert sample_families(ids[0], 2, fams, seed=1) != sample_families(ids[0], 2, fams, seed=0) or \
        sample_families(ids[1], 2, fams, seed=1) != sample_families(ids[1], 2, fams, seed=0)
    with pytest.raises(PromptError, match="tasks_per_chunk=7"):
        sample_families(ids[0], 7, fams)


def test_training_text_layout():
    db = load_prompts("legal", "v1")
    text = training_text("  The licensee shall pay.\n", [("Summarize the passage above.", " It must pay. "),
                                                           ("Q2?", "A2")], db)
    assert text == ("The licensee shall pay.\n\nQuestion: Summarize the passage above.\nAnswer: It must pay.\n\n"
                    "Question: Q2?\nAnswer: A2")


def test_word_picking_prefers_domain_vocabulary(legal_texts):
    db = load_prompts("legal", "v1")
    text = next(t for t in legal_texts if "warranty" in t.lower() and "license" in t.lower())
    words = db.pick_words(text).split(", ")
    assert len(words) == db.word_count
    assert all(w in db.vocabulary for w in words)
    assert all(w in text.lower() for w in words)
