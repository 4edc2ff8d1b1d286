"""`plancc fmt`: the exact canonical layout, and comments staying with their statements."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from compiler import ir
from compiler.checkpoint import format_model_block
from compiler.fmt import format_plan, format_source
from compiler.parse import parse
from executor.cli import main as plancc
from tests.helpers.plans import SMOL_HEADER

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


# ---- what fmt refuses ---------------------------------------------------------------

FACTS_LINE = "  layers 30  hidden 576  ffn 1536  vocab 49152  tied true\n"
REFUSED = [
    # each of these printed a plan that meant something else, or did not parse
    ("P008", SMOL_HEADER + 'source "a"\nsource "b"\n'),  # one source silently dropped
    ("P005", SMOL_HEADER.replace("plan 1\n", "")),  # became `plan 0`
    ("P009", SMOL_HEADER.replace(FACTS_LINE, FACTS_LINE * 2)),  # merged into one broken line
    ("P008", SMOL_HEADER + "calibration builtin\ncalibration wikitext2\n"),
    ("P003", SMOL_HEADER.replace("  arch llama", "  arch llama\n  colour 3")),
    ("P011", SMOL_HEADER.replace("heads 9", "heads true")),
    ("P001", SMOL_HEADER + "drop layers\n"),
]


@pytest.mark.parametrize(
    ("code", "text"), REFUSED, ids=[f"{c}-{i}" for i, (c, _) in enumerate(REFUSED)]
)
def test_fmt_refuses_syntax_and_header_errors(code: str, text: str) -> None:
    result = format_source(text)
    assert result.text is None and result.reason
    assert code in {d.code for d in result.diagnostics}
    assert all(d.is_error for d in result.diagnostics)


@pytest.mark.parametrize(
    ("code", "text"), REFUSED, ids=[f"{c}-{i}" for i, (c, _) in enumerate(REFUSED)]
)
def test_fmt_cli_refuses_and_leaves_the_file(
    code: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.prn"
    path.write_text(text, encoding="utf-8")
    for argv in (["fmt", str(path)], ["fmt", "--check", str(path)]):
        assert plancc(argv) == 1
        out, err = capsys.readouterr()
        assert f"error[{code}]" in err and f"{path}: not formatted: fix the " in err
        assert out == ""
        assert path.read_text(encoding="utf-8") == text


def test_fmt_formats_plans_with_other_errors() -> None:
    """Errors in the statements (out of range, conflicts) are the plan's meaning: kept."""
    text = SMOL_HEADER + "drop layers 31\nmlp layers 3 width 0\nmlp layers 3 width 8\n"
    formatted = format_source(text).text
    assert formatted is not None and formatted.endswith(
        "drop layers 31\n\nmlp layers 3 width 0\nmlp layers 3 width 8\n"
    )


def test_form_feed_and_line_separators_do_not_move_comments() -> None:
    # \f, \v, \x1c, \x85 and \u2028 end a line for str.splitlines, not for the parser
    odd = "\f\v\x1c\x85\u2028"
    text = (
        SMOL_HEADER.replace('"sha256:0000"', f'"sha256:{odd}0000"  # odd {odd} bytes')
        + f"# why 3 {odd} end\ndrop layers 3  # t3\n\f# why 5\nmlp layers 5 width 1024  # t5\n"
    )
    plan = parse(text).plan
    assert plan is not None
    assert [(c.line, c.trailing) for c in plan.comments] == [
        (6, True),
        (8, False),
        (9, True),
        (10, False),
        (11, True),
    ]
    once = format_source(text).text
    assert once is not None
    assert f'  fingerprint "sha256:{odd}0000"  # odd {odd} bytes\n' in once
    assert f"# why 3 {odd} end\ndrop layers 3  # t3\n" in once
    assert "# why 5\nmlp layers 5 width 1024  # t5\n" in once
    assert format_source(once).text == once


def test_fmt_keeps_comments_of_thousands_of_statements() -> None:
    """Each comment finds its statement by binary search (was a scan per comment)."""
    head = parse(SMOL_HEADER).plan
    assert head is not None
    n = 20_000
    statements = tuple(
        ir.DropLayers(ir.Selection((ir.Range(i, i),)), ir.Span(8 + 2 * i, 1, 8 + 2 * i, 14))
        for i in range(n)
    )
    comments = tuple(
        c
        for i in range(n)
        for c in (ir.Comment(f"# about {i}", 7 + 2 * i, False), ir.Comment("# t", 8 + 2 * i, True))
    )
    plan = dataclasses.replace(head, statements=statements, comments=comments)
    text = format_plan(plan)  # a linear scan per comment took minutes here
    assert "# about 12345\ndrop layers 12345  # t\n" in text
