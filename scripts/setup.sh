#!/usr/bin/env bash
# Create .venv and install plancc with its test tools and the heal extra (peft, matplotlib).
# Idempotent; needs only python3 >= 3.11.
# torch is installed first, pinned, so pip takes the CPU build and never pulls a multi-GB
# CUDA build; the rest follows constraints.txt (the versions the project is tested with).
# The test extra includes llama-cpp-python (llama.cpp, to run GGUF exports in the tests):
# PyPI has no Linux wheel, so pip compiles its sdist once (~10 min on 2 cores) and keeps
# the wheel in its cache (~/.cache/pip), so later runs install in seconds. CMAKE_ARGS keep
# that build small (the library and its bindings only: no tools, server, tests or the
# multimodal library) and portable: x86-64-v3 (AVX2/FMA/F16C) instead of -march=native,
# because the cached wheel is reused by every later install from that cache, on whatever
# CPU it then runs. Set CMAKE_ARGS yourself to override (e.g. -DGGML_NATIVE=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
if [ "$(uname -m)" = x86_64 ]; then
  LLAMA_CPU="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
else
  LLAMA_CPU=""
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $LLAMA_CPU}"
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test,heal]'
