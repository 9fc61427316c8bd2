"""Readers: every input record becomes one document or one reject with a reason (no Ray needed)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from transformllm_ray.schema import Reject
from transformllm_ray.sources.builtin import licensedcode_files, package_doc_files
from transformllm_ray.sources.readers import RawDoc, WorkFile, detect_format, parse_front_matter, read_file


def _read(path, fmt=None, **kw):
    p = str(path)
    return list(read_file(WorkFile(p, path.stat().st_size, fmt or detect_format(p)), **kw))


def _reasons(recs):
    return [r.reason for r in recs if isinstance(r, Reject)]


def test_jsonl_every_line_is_a_doc_or_a_reject(tmp_path, legal_texts):
    lines = [
        json.dumps({"text": legal_texts[0], "court": "x"}).encode(),
        b"{not json",
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        b"",
        '{"text": "caf\u00e9"}'.encode("latin-1"),  # a Latin-1 byte, not UTF-8
        json.dumps({"text": legal_texts[1]}).encode(),
    ]
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    recs = _read(f)
    assert len(recs) == len(lines)
    assert _reasons(recs) == ["invalid_json", "wrong_schema", "wrong_schema", "wrong_schema", "empty", "non_utf8"]
    docs = [r for r in recs if isinstance(r, RawDoc)]
    assert [d.text for d in docs] == [legal_texts[0], legal_texts[1]]
    assert docs[0].metadata == {"court": "x"}
    offsets = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]  # where each line starts
    assert docs[0].ref.endswith("a.jsonl#B000000000000") and docs[1].ref.endswith(f"#B{offsets[7]:012d}")
    assert all(len(r.excerpt) <= 200 for r in recs if isinstance(r, Reject))


def test_jsonl_gzip_and_custom_text_field(tmp_path, legal_texts):
    f = tmp_path / "b.jsonl.gz"
    f.write_bytes(gzip.compress((json.dumps({"body": legal_texts[2]}) + "\n").encode()))
    recs = _read(f, text_field="body")
    assert [type(r) for r in recs] == [RawDoc] and recs[0].text == legal_texts[2]


def test_compressed_jsonl_of_every_codec_reads_the_same(tmp_path, legal_texts):
    """gzip, bz2, zstd, lz4 through pyarrow; xz (Pile of Law's .jsonl.xz) through lzma. Same records and
    references (byte offsets in the decompressed stream) as the uncompressed file."""
    import bz2
    import lzma

    import pyarrow as pa

    raw = "".join(json.dumps({"text": t}) + "\n" for t in legal_texts[:5]).encode() + b"{broken\n"
    (tmp_path / "plain.jsonl").write_bytes(raw)
    want = [(r.ref.rsplit("#", 1)[1], getattr(r, "text", r.reason if isinstance(r, Reject) else None))
            for r in _read(tmp_path / "plain.jsonl")]
    assert len(want) == 6 and want[-1][1] == "invalid_json"
    codecs = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
              ".zst": lambda b: pa.compress(b, "zstd", asbytes=True),
              ".lz4": None}
    for ext, fn in codecs.items():
        f = tmp_path / f"c.jsonl{ext}"
        if ext == ".lz4":
            with pa.output_stream(str(f), compression="lz4") as out:
                out.write(raw)
        elif ext == ".zst":
            with pa.output_stream(str(f), compression="zstd") as out:
                out.write(raw)
        else:
            f.write_bytes(fn(raw))
        got = [(r.ref.rsplit("#", 1)[1], getattr(r, "text", r.reason if isinstance(r, Reject) else None))
               for r in _read(f)]
        assert got == want, ext


def _pieces(path, fmt, cuts):
    size = path.stat().st_size
    bounds = [0, *cuts, size]
    return [WorkFile(str(path), size, fmt, lo=a, hi=b) for a, b in zip(bounds, bounds[1:])]


def test_jsonl_byte_ranges_yield_every_line_once(tmp_path, legal_texts):
    """Pieces cut anywhere (mid-line, right after a newline, on a newline, a range inside one long line) yield
    each line exactly once, with the same references as a whole-file read."""
    lines = [json.dumps({"text": t}).encode() for t in legal_texts[:12]] + [b"", b"{bad json"]
    raw = b"\r\n".join(lines[:3]) + b"\n" + b"\n".join(lines[3:])  # CRLF lines too; no final newline
    f = tmp_path / "big.jsonl"
    f.write_bytes(raw)
    whole = [(r.ref, type(r).__name__) for r in _read(f)]
    assert len(whole) == len(lines)
    nl = [i for i, b in enumerate(raw) if b == 10]
    cut_sets = [[1], [nl[0]], [nl[0] + 1], [nl[2] - 5, nl[2] + 1, nl[5]], list(range(97, len(raw), 97)),
                [nl[4] + 3, nl[4] + 9]]  # the last: two cuts inside one line, the middle piece yields nothing
    for cuts in cut_sets:
        got = [(r.ref, type(r).__name__) for p in _pieces(f, "jsonl", cuts) for r in read_file(p)]
        assert got == whole, cuts


def test_binary_jsonl_cut_into_pieces_is_one_reject(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b"\x00\x01\x02\n" * 3000)
    recs = [r for p in _pieces(f, "jsonl", [4000, 8000]) for r in read_file(p)]
    assert [r.reason for r in recs] == ["binary"]


def test_parquet_row_group_pieces(tmp_path, legal_texts):
    pq.write_table(pa.table({"text": legal_texts[:10], "n": list(range(10))}), tmp_path / "rg.parquet",
                   row_group_size=3)  # row groups of 3, 3, 3, 1 rows
    f = tmp_path / "rg.parquet"
    whole = [(r.ref, r.text, r.metadata) for r in _read(f)]
    size = f.stat().st_size
    pieces = [WorkFile(str(f), size, "parquet", lo=a, hi=b) for a, b in ((0, 1), (1, 3), (3, -1))]
    got = [(r.ref, r.text, r.metadata) for p in pieces for r in read_file(p)]
    assert got == whole and whole[9][0].endswith("#R000000009") and whole[9][2] == {"n": 9}
    pq.write_table(pa.table({"body": ["x"] * 4}), tmp_path / "nocol.parquet", row_group_size=2)
    g = tmp_path / "nocol.parquet"
    recs = [r for lo, hi in ((0, 1), (1, -1)) for r in read_file(WorkFile(str(g), 1, "parquet", lo=lo, hi=hi))]
    assert [r.reason for r in recs] == ["wrong_schema"]  # one reject for the file, from its first piece


def test_binary_and_non_utf8_files(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00" * 50)
    (tmp_path / "latin.txt").write_bytes("Licence accord\u00e9e".encode("latin-1"))
    assert _reasons(_read(tmp_path / "bin.jsonl")) == ["binary"]
    assert _reasons(_read(tmp_path / "bin.txt")) == ["binary"]
    assert _reasons(_read(tmp_path / "latin.txt")) == ["non_utf8"]


def test_parquet_rows_nulls_and_schema_problems(tmp_path, legal_texts):
    pq.write_table(pa.table({"text": [legal_texts[0], None, legal_texts[3]], "id": [1, 2, 3]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    recs = _read(tmp_path / "ok.parquet")
    assert _reasons(recs) == ["empty"] and sum(isinstance(r, RawDoc) for r in recs) == 2
    assert recs[2].ref.endswith("#R000000002") and recs[2].metadata == {"id": 3}
    assert _reasons(_read(tmp_path / "nocol.parquet")) == ["wrong_schema"]
    assert _reasons(_read(tmp_path / "int.parquet")) == ["wrong_schema"]
    assert _reasons(_read(tmp_path / "broken.parquet")) == ["invalid_parquet"]


def test_unknown_format_is_a_reject_not_a_crash(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    recs = _read(tmp_path / "table.csv")
    assert _reasons(recs) == ["unsupported_format"]


def test_licensedcode_source_skips_deprecated_and_non_english():
    files = licensedcode_files()
    assert len(files) > 2000
    assert all(f.ref.startswith("licensedcode-data==") for f in files)  # machine-independent refs
    by_name = {f.ref.rsplit("/", 1)[1]: f for f in files}
    mit = list(read_file(by_name["mit.LICENSE"]))
    assert isinstance(mit[0], RawDoc) and "Permission is hereby granted" in mit[0].text
    assert mit[0].metadata["key"] == "mit" and mit[0].metadata["category"] == "Permissive"
    reasons = {r.reason for f in files[:600] for r in read_file(f) if isinstance(r, Reject)}
    assert "deprecated" in reasons


def test_front_matter_parser():
    meta, body = parse_front_matter("---\nkey: x\nnotes: |\n    multi\nlanguage: de\n---\n\nBody text\n")
    assert meta == {"key": "x", "language": "de"} and body.strip() == "Body text"


def test_package_docs_source_reads_real_readmes():
    files = package_doc_files()
    assert len(files) > 20
    docs = [r for f in files[:40] for r in read_file(f) if isinstance(r, RawDoc)]
    assert sum(len(d.text) > 500 for d in docs) > 5


def test_package_docs_listing_does_not_change_when_ray_is_imported():
    """`import ray` puts Ray's vendored packages on sys.path; the builtin corpus must not grow with it (a
    changed listing is a changed input of ingest, and refused the stages after it within one run)."""
    import subprocess
    import sys

    code = ("from transformllm_ray.sources.builtin import package_doc_files as f\n"
            "a = [w.ref for w in f()]\nimport ray  # noqa\nb = [w.ref for w in f()]\n"
            "assert a == b, sorted(set(b) ^ set(a))\nprint(len(a))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and int(r.stdout.strip()) > 20, r.stderr[-2000:]
