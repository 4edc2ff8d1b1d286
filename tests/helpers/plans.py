"""Plan texts: model headers for plans checked without a checkpoint, and `write_plan`
for one written against a real (tiny) checkpoint."""

from __future__ import annotations

from pathlib import Path

from compiler.checkpoint import load_checkpoint_facts

SMOL_HEADER = """\
plan 1
model "SmolLM2-135M-Instruct" {
  arch llama
  layers 30  hidden 576  ffn 1536  vocab 49152  tied true
  heads 9  kv_heads 3  head_dim 64
  fingerprint "sha256:0000"
}
"""  # statements appended after it start on line 8

MOE_HEADER = """\
plan 1
model "qwen2moe-tiny" {
  arch qwen2_moe
  layers 6  hidden 256  ffn 512  vocab 8192  tied true
  heads 8  kv_heads 2  head_dim 32
  experts 16  top_k 2  expert_ffn 128  shared_ffn 256
  expert_groups 4
  qkv_bias true
  dense_layers 5
  fingerprint "sha256:0000"
}
"""  # statements appended after it start on line 12

FIRST_BODY_LINE = 8
FIRST_MOE_LINE = 12


def write_plan(tmp_path: Path, model_dir: Path, body: str, name: str = "plan.prn") -> Path:
    """A plan for `model_dir` (its real model block and fingerprint, `source` set) plus `body`."""
    ck = load_checkpoint_facts(model_dir)
    text = f'plan 1\n{ck.model_block()}source "{model_dir}"\n\n{body.strip()}\n'
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path
