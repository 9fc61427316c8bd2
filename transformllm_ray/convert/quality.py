"""Quality gate on every generated answer: empty, too short, truncated, looping, wrong language.

    reason, detail = check_output(text, finish_reason, cfg.convert.quality)   # (None, "") when it passes

Checks, in this order (the first failing one is the reason):
- `empty`: nothing but whitespace.
- `too_short`: fewer than `quality.min_chars` characters after stripping.
- `truncated`: the engine stopped at max_tokens (`finish_reason == "length"`) and `quality.reject_truncated`;
  such answers end mid-sentence.
- `looping`: more than `quality.max_repeated_ngram_fraction` of the word n-grams (n = `quality.ngram`) repeat
  an earlier n-gram of the same answer. Real licence text (first 1,500 characters of 1,676 English
  licences) scores median 0.03, 90th percentile 0.08, 99th 0.17; SmolLM2-135M's greedy loops ("is owned by
  Fourthought, Inc. and is owned by ...") score far above the 0.35 default.
- `wrong_language`: fewer than `quality.min_english_fraction` of the letters are ASCII (other scripts), or the answer holds more function words of German/French/Spanish/Italian/Portuguese/Dutch
  than of English (at least 3 of them): catches Latin-script languages, which are ASCII-heavy too.
"""

from __future__ import annotations

import re

from transformllm_ray.config import QualityConfig

_WORDS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_NGRAM_WORDS = re.compile(r"\w+")

ENGLISH = frozenset("""
a about above after again against all also an and any are as at be because been before being below between
both but by can could did do does doing down during each either few for from further had has have having he
her here hers him his how i if in into is it its itself may might more most must no nor not of off on once
only or other our out over own same shall she should so some such than that the their them then there these
they this those through to too under until up upon us very was we were what when where which while who whom
why will with within without would you your
""".split())

# Frequent function words of other languages written in Latin script, minus every word that is also common in
# English legal text or its names ("de facto", "et al.", "non-exclusive", "per annum", MIT, ".com", OS,
# Los Angeles, "met", "van", "pour", "par", "con", "die", "an", "in" are left out).
FOREIGN = frozenset("""
der das und ist nicht von zu den dem sich werden oder eine einer eines auch auf für wird sind nach bei
durch wenn über unter diese dieser vom zum zur
le la les est une du des avec sur dans qui ce cette sont aux ou pas être leur
el del por para una es lo su sus como pero más este esta ser
il di che della delle degli dei sono gli nel nella questo questa anche essere
uma não pelo pela seu sua são ao que da dos
het een dat niet zijn voor ook worden deze wordt bij naar
""".split())


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 = none repeats; -> 1 for a loop)."""
    words = [w.lower() for w in _NGRAM_WORDS.findall(text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def language_scores(text: str) -> dict[str, float]:
    """Letters counted one by one (a run of CJK characters is one regex "word" but many letters)."""
    letters = [c for c in text if c.isalpha()]
    lower = [w.lower() for w in _WORDS.findall(text)]
    return {"letters": len(letters),
            "ascii_fraction": sum(1 for c in letters if c.isascii()) / len(letters) if letters else 1.0,
            "english": sum(1 for w in lower if w in ENGLISH), "foreign": sum(1 for w in lower if w in FOREIGN)}


def check_output(text: str, finish_reason: str, q: QualityConfig) -> tuple[str | None, str]:
    """(reason, detail) of the first failing check, or (None, "") when the answer passes."""
    body = (text or "").strip()
    if not body:
        return "empty", "no text generated"
    if len(body) < q.min_chars:
        return "too_short", f"{len(body)} chars < quality.min_chars={q.min_chars}"
    if q.reject_truncated and finish_reason == "length":
        return "truncated", "stopped at max_tokens (quality.reject_truncated)"
    frac = repeated_ngram_fraction(body, q.ngram)
    if frac > q.max_repeated_ngram_fraction:
        return "looping", (f"{frac:.2f} of word {q.ngram}-grams repeat > "
                           f"quality.max_repeated_ngram_fraction={q.max_repeated_ngram_fraction}")
    lang = language_scores(body)
    if lang["letters"] and lang["ascii_fraction"] < q.min_english_fraction:
        return "wrong_language", (f"{lang['ascii_fraction']:.2f} of letters are ASCII < "
                                  f"quality.min_english_fraction={q.min_english_fraction}")
    if lang["foreign"] >= 3 and lang["foreign"] > lang["english"]:
        return "wrong_language", f"{lang['foreign']} non-English function words > {lang['english']} English ones"
    return None, ""
