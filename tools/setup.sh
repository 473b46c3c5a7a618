#!/usr/bin/env bash
# Create .venv with bbformat and everything its tests and demo need. Idempotent: re-running is fast.
# torch is pinned and installed FIRST (the CPU wheel); otherwise a dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.bbformat-setup-$(cat pyproject.toml tools/setup.sh bbformat/*.c | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
    .venv/bin/python -m pip install -q -e ".[test,models,remote]" "torch==${TORCH_VERSION}"
    rm -f .venv/.bbformat-setup-*
    touch "$stamp"
fi
