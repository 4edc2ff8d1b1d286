"""`plancc fmt`: the exact canonical layout, and comments staying with their statements."""

from __future__ import annotations

from compiler.checkpoint import format_model_block
from compiler.fmt import format_plan
from compiler.parse import parse

MESSY = """\
# made by plangen 0.1 from SmolLM2 (provenance header)

plan 1
mlp layers 5, 4, 3 width 1024 by magnitude   # mlp scores: 0.4
calibration builtin samples 32 seqlen 512 seed 0
model "SmolLM2" {
  fingerprint "sha256:abc"   # pinned
  # shape facts
  heads 9 kv_heads 3 head_dim 64
  arch llama
  layers 30 hidden 576 ffn 1536
}

# the depth decision
drop layers 22..23, 21   # angular distance 0.118
keep layers 29
attn layers 10..12 drop groups 1 # taylor g1 0.12
bundle B layers 21..23
# end of plan
"""

CANONICAL = """\
# made by plangen 0.1 from SmolLM2 (provenance header)
plan 1
model "SmolLM2" {
  arch llama
  layers 30  hidden 576  ffn 1536
  # shape facts
  heads 9  kv_heads 3  head_dim 64
  fingerprint "sha256:abc"  # pinned
}
calibration builtin samples 32 seqlen 512 seed 0

keep layers 29
# the depth decision
drop layers 21..23  # angular distance 0.118
bundle B layers 21..23

attn layers 10..12 drop groups 1  # taylor g1 0.12
mlp layers 3..5 width 1024  # mlp scores: 0.4

# end of plan
"""


def fmt(text: str) -> str:
    parsed = parse(text)
    assert parsed.plan is not None, parsed.diagnostics
    return format_plan(parsed.plan)


def test_canonical_layout_exact() -> None:
    assert fmt(MESSY) == CANONICAL


def test_idempotent_and_same_meaning() -> None:
    assert fmt(CANONICAL) == CANONICAL
    assert parse(CANONICAL).plan == parse(MESSY).plan


def test_string_escapes_survive() -> None:
    text = 'plan 1\nmodel "a \\"quoted\\" \\\\ name" {\n  arch llama\n  layers 2\n}\n'
    assert fmt(text) == text
    plan = parse(text).plan
    assert plan is not None and plan.model is not None
    assert plan.model.name == 'a "quoted" \\ name'


def test_header_output_is_already_canonical() -> None:
    block = format_model_block(
        "m",
        "qwen2_moe",
        {"layers": 6, "hidden": 256, "experts": 16, "qkv_bias": True, "dense_layers": (0, 1, 5)},
    )
    plan = "plan 1\n" + block
    assert fmt(plan) == plan
    assert "  dense_layers 0..1, 5\n" in block
