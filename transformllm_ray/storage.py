"""Paths and files on local disk or object storage (s3:// gs://), through pyarrow's filesystems.

Everything a stage writes goes through here, so that writes are idempotent and a reader never sees half a
file: `write_parquet_atomic` and `write_json_atomic` write a temporary sibling, then move it into place (a
local rename is atomic; an object store makes an object visible only once its upload is complete).

    fs, path = filesystem("s3://bucket/corpus")
    files = expand_inputs(["data/*.jsonl", "gs://bucket/pile-of-law/"])
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_GLOB = set("*?[")


@dataclass(frozen=True)
class FileRef:
    uri: str
    """Canonical URI: absolute local path or scheme://bucket/key."""
    size: int
    """Size in bytes."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _to_uri(uri_like: str, path: str) -> str:
    if is_remote(uri_like):
        scheme = uri_like.split("://", 1)[0]
        return f"{scheme}://{path}"
    return path


def expand_inputs(paths: Iterable[str]) -> list[FileRef]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated list of files.

    Raises FileNotFoundError naming the path when a path or glob matches nothing: an empty input is a
    configuration mistake, not an empty corpus.
    """
    out: dict[str, FileRef] = {}
    for p in paths:
        fs, path = filesystem(p)
        found: list[pafs.FileInfo] = []
        if any(c in _GLOB for c in path):
            # List from the deepest folder without glob characters, then match the full pattern.
            parts = path.split("/")
            i = next(i for i, part in enumerate(parts) if any(c in _GLOB for c in part))
            root = "/".join(parts[:i]) or "/"
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
            found = [f for f in infos if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [info]
            elif info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [f for f in infos if f.type == pafs.FileType.File]
        found = [f for f in found if not os.path.basename(f.path).startswith((".", "_"))]
        if not found:
            raise FileNotFoundError(f"input path matches no file: {p}")
        for f in found:
            uri = _to_uri(p, f.path)
            out[uri] = FileRef(uri=uri, size=int(f.size or 0))
    return [out[k] for k in sorted(out)]


def files_digest(files: Iterable[Any]) -> str:
    """A short, readable identity of a file list (objects with `size` and `ref` or `uri`): count, total bytes and
    a hash of (ref, size) pairs. A stage's recorded inputs carry it, so an input file added, removed or resized
    is a changed input; builtin files are named by their package reference, not by where the venv lies."""
    import hashlib

    files = list(files)
    listing = "\n".join(f"{getattr(f, 'ref', '') or f.uri}\t{f.size}" for f in files)
    h = hashlib.sha256(listing.encode()).hexdigest()[:12]
    return f"{len(files)} files, {sum(f.size for f in files)} bytes, sha256:{h}"


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path, compression="detect") as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly inside a folder (sorted URIs), skipping hidden/temporary ones; [] if it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = [
        f.path for f in infos
        if f.type == pafs.FileType.File and f.path.endswith(suffix)
        and not os.path.basename(f.path).startswith((".", "_tmp"))
    ]
    return sorted(_to_uri(uri, n) for n in names)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove_tree(uri: str) -> None:
    """Delete a folder and everything under it (nothing if it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def remove_temporaries(uri: str) -> int:
    """Delete `.tmp-*` leftovers of killed writers in a folder; returns how many."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    n = 0
    for f in infos:
        if f.type == pafs.FileType.File and os.path.basename(f.path).startswith(".tmp-"):
            fs.delete_file(f.path)
            n += 1
    return n


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue())


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def read_parquet(uris: list[str] | str, columns: list[str] | None = None) -> pa.Table:
    """Read one or many Parquet files into one table (schema of the first file)."""
    if isinstance(uris, str):
        uris = [uris]
    tables = []
    for u in uris:
        fs, path = filesystem(u)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    if not tables:
        raise FileNotFoundError("no parquet files to read")
    return pa.concat_tables(tables, promote_options="default")


@contextlib.contextmanager
def local_folder(uri: str) -> Iterator[str]:
    """A local path holding the folder `uri`, for readers that take local paths only (transformers'
    `from_pretrained`): `uri` itself unless it is s3:// gs:// (so a hub model name passes through); for those, a
    temporary copy deleted on exit."""
    if not is_remote(uri):
        yield uri
        return
    import shutil
    import tempfile

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder at {uri}")
    tmp = tempfile.mkdtemp(prefix="transformllm-copy-")
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
