#!/usr/bin/env bash
# Create .venv with bbformat and everything its tests and demo need. Idempotent: re-running is fast and prints
# one line ("setup: .venv up to date"); otherwise it prints one line per step (pip itself runs with -q).
# torch is pinned and installed FIRST; otherwise a dependency pulls another (multi-GB CUDA) build.
# The stamp hashes pyproject.toml, this script and the C sources: changing any of them reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=".venv/.bbformat-setup-$(cat pyproject.toml tools/setup.sh bbformat/*.c | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
    echo "setup: .venv up to date"
    exit 0
fi
echo "setup: installing torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
echo "setup: installing bbformat[test,models,remote] (editable; compiles bbformat/_kernels.c if a C compiler is found)"
.venv/bin/python -m pip install -q -e ".[test,models,remote]" "torch==${TORCH_VERSION}"
rm -f .venv/.bbformat-setup-*
touch "$stamp"
echo "setup: done"
