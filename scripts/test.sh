#!/usr/bin/env bash
# Install everything, then run the whole test suite (slow end-to-end tests on the real
# SmolLM2 checkpoint included) and the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# -m "": every test, whatever its markers (plain `pytest` skips slow and train, see
# pyproject.toml); a -m given to this script comes later and wins.
.venv/bin/python -m pytest -q -m "" "$@"
