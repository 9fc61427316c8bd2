"""Text normalisation, content ids and binary detection shared by the ingest readers and stages.

normalize(): Unicode NFC; CRLF/CR -> LF; exotic spaces -> space; zero-width and control characters removed
(tab and newline kept); runs of spaces collapsed; spaces around newlines trimmed; 3+ newlines -> one blank
line (paragraph breaks survive, so chunking can cut on them).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_HSPACE = re.compile(r"[ \t]+")
_AROUND_NL = re.compile(r" ?\n ?")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _AROUND_NL.sub("\n", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def content_id(text: str) -> str:
    """Document id: first 20 hex digits (80 bits) of sha256 of the normalised text; stable everywhere."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def looks_binary(data: bytes, sample: int = 8192) -> bool:
    """NUL bytes, or >10% control bytes, in the first `sample` bytes: not text."""
    head = data[:sample]
    if not head:
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return ctrl / len(head) > 0.10


def unit_fraction(doc_id: str, salt: int, purpose: str) -> float:
    """Deterministic number in [0, 1) from a document id: assigns documents to held-out/val splits."""
    h = hashlib.sha256(f"{purpose}:{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64
