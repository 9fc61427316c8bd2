"""Token-bounded chunking on paragraph, then sentence, boundaries.

    chunker = Chunker(load_fast_tokenizer("builtin:smollm2-135m-instruct"), max_tokens=1800)
    pieces = chunker.split(text)     # [(chunk_text, n_tokens), ...], every n_tokens <= max_tokens

A document that fits is one chunk (one tokenizer call: most licence texts, ~1,500 tokens on average). Longer
ones are cut into paragraphs (blank lines), paragraphs too long into sentences, sentences too long at token
boundaries (offset mapping), and the pieces packed greedily. The count stored is exact: each packed chunk is
re-encoded, and a chunk that came out over the bound (BPE merges across a join) gives its last piece back.
Counts exclude special tokens (BOS/EOS), which the converter and packer add themselves.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=\S)|\n")


class Chunker:
    """`tokenizer`: a Rust `tokenizers.Tokenizer` (see models.assets.load_fast_tokenizer)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tok = tokenizer
        self.max_tokens = max_tokens

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _hard_split(self, text: str) -> list[str]:
        """Cut at token boundaries into pieces that re-encode within the bound, preferring a cut between
        words (a token that starts at or right after a space) within the last quarter of each window."""
        offsets = self.tok.encode(text, add_special_tokens=False).offsets
        at_space = [s < len(text) and (text[s].isspace() or (s > 0 and text[s - 1].isspace())) for s, _ in offsets]
        step = max(1, self.max_tokens - 8)  # 8 tokens of slack for re-tokenisation at the cuts
        while True:
            cuts, i = [], step
            while i < len(offsets):
                j = next((k for k in range(i, i - step // 4, -1) if at_space[k]), i)
                cuts.append(offsets[j][0])
                i = j + step
            bounds = [0] + cuts + [len(text)]
            pieces = [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
            if step == 1 or max(self.count(pieces), default=0) <= self.max_tokens:
                return pieces
            step = max(1, step // 2)

    def _units(self, text: str) -> list[tuple[str, str, int]]:
        """(separator before, text, tokens) pieces, each within the bound."""
        paras = [p for p in text.split("\n\n") if p.strip()]
        units: list[tuple[str, str, int]] = []
        for para, n in zip(paras, self.count(paras)):
            if n <= self.max_tokens:
                units.append(("\n\n", para, n))
                continue
            sents = [s for s in _SENTENCE_END.split(para) if s.strip()]
            sep = "\n\n"
            for sent, m in zip(sents, self.count(sents)):
                pieces = [sent] if m <= self.max_tokens else self._hard_split(sent)
                counts = [m] if m <= self.max_tokens else self.count(pieces)
                for piece, k in zip(pieces, counts):
                    units.append((sep, piece, k))
                    sep = " "
        return units

    def split(self, text: str) -> list[tuple[str, int]]:
        if not text.strip():
            return []
        whole = self.count([text])[0]
        if whole <= self.max_tokens:
            return [(text, whole)]
        units = self._units(text)
        chunks: list[tuple[str, int]] = []
        i = 0
        while i < len(units):
            # Greedy pack by estimated length (pieces + 1 token per join), then check exactly.
            j, est = i, 0
            while j < len(units) and (j == i or est + units[j][2] + 1 <= self.max_tokens):
                est += units[j][2] + (1 if j > i else 0)
                j += 1
            while True:
                body = units[i][1] + "".join(sep + t for sep, t, _ in units[i + 1:j])
                n = self.count([body])[0]
                if n <= self.max_tokens or j == i + 1:
                    break
                j -= 1
            if n > self.max_tokens:  # a single piece over the bound after all: cut it at token boundaries
                pieces = self._hard_split(body)
                chunks.extend(zip(pieces, self.count(pieces)))
            else:
                chunks.append((body, n))
            i = j
        return chunks
