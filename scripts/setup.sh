#!/usr/bin/env bash
# Create .venv and install plancc with its test tools. Idempotent; needs only python3 >= 3.11.
# torch is installed first, pinned, so pip takes the CPU build and never pulls a multi-GB
# CUDA build; the rest follows constraints.txt (the versions the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
