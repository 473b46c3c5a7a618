#!/usr/bin/env bash
# The test command: set up .venv (first run only) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
