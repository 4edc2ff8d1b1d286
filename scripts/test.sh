#!/usr/bin/env bash
# Install everything, then run the whole test suite (slow end-to-end tests on the real
# SmolLM2 checkpoint included) and the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
