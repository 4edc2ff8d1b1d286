#!/usr/bin/env bash
# Issue 36's GPU row: the 32-layer synthetic Llama-3-8B (16 GB bf16 on disk) analyzed on
# one GPU one decoder layer at a time (`--offload`) and loaded whole, with the peak
# device memory (torch.cuda.max_memory_allocated), the peak host RssAnon and the time of
# each (`benchmarks/layerwise_memory.py --analyze --device cuda`, strategy flap, 4
# windows of 512 tokens, float32 as the planner runs).
#
#   bash benchmarks/gpu_issue36.sh prepare     # here, once: fills .gpu/ (ignored by git)
#   bash benchmarks/gpu_issue36.sh run         # on the device machine (device run, carry [".gpu"])
#
# `prepare` downloads the one dependency the device image lacks (lark, pure Python) as a
# wheel and copies the SmolLM2 demo tokenizer (analyze reads text) into .gpu/. `run`
# installs them, builds the checkpoint under /tmp (about 16 GB), and writes both tables
# under $OUT (or /tmp/plancc-gpu): gpu-layerwise.md and gpu-whole.md. About 6-8 minutes
# on an H100; give the call a 600 s limit.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    mkdir -p .gpu/whl .gpu/tokenizer
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl lark
    src="${PLANCC_CACHE:-$HOME/.cache/plancc}/SmolLM2-135M-Instruct"
    cp "$src"/tokenizer.json "$src"/tokenizer_config.json .gpu/tokenizer/
    du -sh .gpu
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
    demo="$HOME/.cache/plancc/SmolLM2-135M-Instruct"
    mkdir -p "$demo" && cp .gpu/tokenizer/* "$demo"/
    out="${OUT:-/tmp/plancc-gpu}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    common=(--analyze --layers 32 --keep --dir /tmp/plancc-gpu-ckpt --device cuda
        --windows 4 --tokens 512)
    python3 benchmarks/layerwise_memory.py "${common[@]}" --out "$out/gpu-layerwise.md" \
        2> >(tee "$out/gpu-layerwise.err" >&2)
    python3 benchmarks/layerwise_memory.py "${common[@]}" --in-memory 1 \
        --out "$out/gpu-whole.md" 2> >(tee "$out/gpu-whole.err" >&2)
    ;;
*)
    echo "usage: bash benchmarks/gpu_issue36.sh prepare|run" >&2
    exit 2
    ;;
esac
