"""The quality gate on real text: real licence prose passes, each failure mode gets its own reason."""

from __future__ import annotations

import os

from transformllm_ray.config import QualityConfig
from transformllm_ray.convert.quality import check_output, repeated_ngram_fraction
from transformllm_ray.sources.builtin import licensedcode_dir
from transformllm_ray.sources.readers import parse_front_matter

Q = QualityConfig()


def _licence(name: str) -> str:
    return parse_front_matter(open(os.path.join(licensedcode_dir(), name), encoding="utf-8").read())[1]


def test_real_english_licence_prose_passes(legal_texts):
    texts = [t[:1500] for t in legal_texts[:200]]
    failed = [(check_output(t, "stop", Q), t[:80]) for t in texts if check_output(t, "stop", Q)[0]]
    assert len(failed) <= 2, failed  # a few licences repeat their own boilerplate; 99% pass


def test_reasons_in_order(legal_texts):
    prose = legal_texts[0][:600]
    assert check_output("", "stop", Q)[0] == "empty"
    assert check_output("  \n\n ", "stop", Q)[0] == "empty"
    assert check_output("Yes.", "stop", Q)[0] == "too_short"
    assert check_output(prose, "length", Q)[0] == "truncated"
    assert check_output(prose, "length", QualityConfig(reject_truncated=False))[0] is None
    assert check_output(prose, "stop", Q) == (None, "")


def test_looping_is_caught_and_measured():
    # A loop of the kind SmolLM2-135M produces greedily (observed on the 4Suite licence).
    loop = ("The passage indicates that the 4Suite software is owned by Fourthought, Inc. " +
            "The 4Suite is owned by Fourthought, Inc. and is owned by Fourthought, Inc. " * 6)
    reason, detail = check_output(loop, "stop", Q)
    assert reason == "looping" and "4-grams" in detail
    assert repeated_ngram_fraction(loop, 4) > 0.6
    assert repeated_ngram_fraction("one two three four five six seven", 4) == 0.0
    # The threshold is the config's: a lenient gate lets the same text through.
    assert check_output(loop, "stop", QualityConfig(max_repeated_ngram_fraction=0.95))[0] is None


def test_wrong_language_on_real_non_english_licences():
    for name in ("cecill-2.1-fr.LICENSE", "cc-by-3.0-de.LICENSE", "cc-by-3.0-nl.LICENSE", "nysl-0.9982-jp.LICENSE",
                 "mulanpsl-2.0.LICENSE", "etalab-2.0.LICENSE"):
        reason, detail = check_output(_licence(name)[:3000], "stop", Q)
        assert reason == "wrong_language", (name, reason, detail)


def test_english_licences_with_foreign_names_are_not_wrong_language():
    # English texts naming places and entities in other languages (Los Angeles, Société, MIT, .com).
    text = ("This Agreement is governed by the laws of the State of California. Any dispute shall be resolved "
            "in Los Angeles County. Portions are licensed under the MIT license by Société Générale de "
            "Logiciel; see www.example.com for the terms, which apply per annum and are non-exclusive.")
    assert check_output(text, "stop", Q) == (None, "")
