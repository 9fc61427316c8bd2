"""Chunker: every chunk within the token bound, exact counts, cuts on paragraph/sentence boundaries."""

from __future__ import annotations

import pytest

from transformllm_ray.ingest.chunking import Chunker
from transformllm_ray.models.assets import load_fast_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def fast_tok(demo_model):
    return load_fast_tokenizer("builtin:smollm2-135m-instruct")


def test_fast_tokenizer_counts_match_transformers(fast_tok, legal_texts):
    hf = load_tokenizer("builtin:smollm2-135m-instruct")
    for text in legal_texts[:20]:
        assert fast_tok.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("bound", [64, 300, 1800])
def test_chunks_respect_bound_and_counts_are_exact(fast_tok, legal_texts, bound):
    ch = Chunker(fast_tok, bound)
    long_texts = sorted(legal_texts, key=len)[-10:]
    for text in long_texts:
        pieces = ch.split(text)
        assert pieces
        for body, n in pieces:
            assert n <= bound
            assert n == len(fast_tok.encode(body, add_special_tokens=False).ids)
        # Nothing lost or reordered: the non-space characters of the chunks are those of the document.
        assert "".join("".join(b for b, _ in pieces).split()) == "".join(text.split())


def test_cuts_prefer_paragraph_boundaries(fast_tok):
    paras = [f"Section {i}. The licensee shall keep the software confidential and shall not disclose it." for i in range(40)]
    text = "\n\n".join(paras)
    pieces = Chunker(fast_tok, 100).split(text)
    assert len(pieces) > 1
    for body, _ in pieces:
        assert body.startswith("Section ") and body.endswith("disclose it.")


def test_one_enormous_sentence_is_cut_at_token_boundaries(fast_tok):
    text = "whereas " * 3000
    pieces = Chunker(fast_tok, 128).split(text.strip())
    assert len(pieces) >= 3000 // 128
    assert all(n <= 128 for _, n in pieces)


def test_hard_cuts_fall_between_words(fast_tok):
    words = ("LICENSEE SHALL NOT REVERSE ENGINEER DECOMPILE OR DISASSEMBLE THE SOFTWARE EXCEPT AS EXPRESSLY "
             "PERMITTED BY APPLICABLE LAW ").split() * 60
    pieces = Chunker(fast_tok, 64).split(" ".join(words))
    assert len(pieces) > 5
    vocab = set(words)
    for body, _ in pieces:
        assert set(body.split()) <= vocab, "a word was cut in two"


def test_short_document_is_one_chunk(fast_tok):
    text = "Short licence text."
    assert Chunker(fast_tok, 1800).split(text) == [(text, len(fast_tok.encode(text, add_special_tokens=False).ids))]
