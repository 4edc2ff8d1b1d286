"""`plancc check` on very large selections: exact diagnostics and resolved plans.

Two kinds of test: the passes and `resolve` on plans built directly as IR (no
parsing, so a 50,000-item selection costs nothing to make; the pairwise P103
scan and the per-layer set rebuilding in `resolve` took minutes on these),
and `check_text` end to end on 10,000-index selections of every statement
kind. They assert the exact diagnostics (codes, messages, folded counts); how
the time grows with the size is measured by `benchmarks/check_scaling.py` (a
quadratic regression shows here as a suite that takes minutes).
"""

from __future__ import annotations

import dataclasses

import pytest

from compiler import ir
from compiler.check import check_text
from compiler.diagnostics import cap_repeats, sort_diagnostics
from compiler.facts import validate_facts
from compiler.parse import parse
from compiler.passes import PASSES, Context
from compiler.resolve import resolve

HEADER = """\
plan 1
model "wide" {{
  arch qwen2_moe
  layers {layers}  hidden 256  ffn 512  vocab 8192  tied true
  heads {heads}  kv_heads {kv}  head_dim 32
  experts {experts}  top_k 2  expert_ffn 128  shared_ffn 256
  fingerprint "sha256:0000"
}}
"""


def header(layers: int = 4096, heads: int = 8, kv: int = 2, experts: int = 16) -> str:
    return HEADER.format(layers=layers, heads=heads, kv=kv, experts=experts)


def sel(values: list[int]) -> ir.Selection:
    """A selection exactly as the parser builds it: one Range per item."""
    return ir.Selection.of(
        [ir.Range(v, v, ir.Span(9, 1 + i, 9, 2 + i)) for i, v in enumerate(values)]
    )


def run_passes(head: str, *statements: ir.Statement) -> tuple[list, object]:
    """check_text's pipeline on an IR plan: (diagnostics, resolved or None)."""
    plan = parse(head).plan
    assert plan is not None and plan.model is not None
    plan = dataclasses.replace(plan, statements=statements)
    facts, diags = validate_facts(plan.model)
    ctx = Context(plan, facts, None)
    for _name, check in PASSES:
        diags += check(ctx)
    diags = cap_repeats(sort_diagnostics(diags))
    resolved = resolve(plan, facts) if not any(d.is_error for d in diags) else None
    return diags, resolved


N = 50_000
SPAN = ir.Span(9, 1, 9, 2)


def test_out_of_range_and_repeated_indices_are_linear() -> None:
    diags, _ = run_passes(
        header(),
        ir.DropLayers(sel([2 * i for i in range(N)]), SPAN),  # 47,952 out of range
        ir.KeepLayers(sel([i % 100 for i in range(N)]), SPAN),  # 49,900 repeated
    )
    by_code = {code: [d for d in diags if d.code == code] for code in ("P103", "P104")}
    assert [d.count for d in by_code["P104"]] == [1] * 5 + [N - 2048 - 5]
    assert [d.count for d in by_code["P103"]] == [1] * 5 + [N - 100 - 5]
    assert [d.message for d in by_code["P104"][:5]] == [
        f"layer {i} is out of range: the model has 4096 layers (0..4095)"
        for i in range(4096, 4106, 2)
    ]
    assert by_code["P104"][-1].message == (
        f"... and {N - 2048 - 5:,} more indices out of range in this statement"
    )
    assert [d.message for d in by_code["P103"][:5]] == [
        f"layer {i} is listed twice" for i in range(5)
    ]
    assert by_code["P103"][-1].message == (
        f"... and {N - 100 - 5:,} more indices listed twice in this statement"
    )
    # The one other diagnostic: the even layers 0..98 are both dropped and kept.
    [guard] = [d for d in diags if d.code not in ("P103", "P104")]
    evens = ", ".join(str(i) for i in range(0, 100, 2))
    assert (guard.code, guard.count) == ("P108", 1)
    assert guard.message == f"layers {evens} are guarded by `keep layers` and cannot be dropped"
    assert len(diags) == 13


@pytest.mark.parametrize("what", ["groups", "experts"])
def test_group_and_expert_selections_are_linear(what: str) -> None:
    if what == "groups":
        head = header(layers=64, heads=65536, kv=65536)
        st: ir.Statement = ir.AttnDropGroups(
            sel(list(range(64))), SPAN, sel(list(range(0, 2 * N, 2)))
        )
    else:
        head = header(layers=64, experts=65536)
        st = ir.MoeDropExperts(sel(list(range(64))), SPAN, sel(list(range(0, 2 * N, 2))))
    diags, _ = run_passes(head, st)
    [folded] = [d for d in diags if d.count > 1]
    assert folded.code == "P104" and folded.count == N - 32768 - 5


def test_resolve_is_linear_in_selection_and_layers() -> None:
    """Each statement's kept groups/experts are computed once, not once per layer."""
    groups = sel(list(range(0, 2 * 30_000, 2)))  # 30,000 of 65,536 groups
    diags, resolved = run_passes(
        header(layers=4096, heads=65536, kv=65536),
        ir.AttnDropGroups(sel(list(range(1, 4096, 2))), SPAN, groups),
        ir.DropLayers(sel(list(range(0, 4096, 2))), SPAN),
        ir.Bundle(sel(list(range(0, 4096, 2))), SPAN, "B"),
    )
    assert not [d for d in diags if d.is_error], diags
    assert resolved is not None
    kept = resolved.layers[1].groups_kept  # type: ignore[attr-defined]
    assert len(kept) == 65536 - 30_000 and kept[:3] == (1, 3, 5)


# ---- end to end ------------------------------------------------------------------------

M = 10_000
EVENS = ", ".join(str(2 * i) for i in range(M))
STATEMENTS = {
    "drop layers, out of range": (header(), f"drop layers {EVENS}\n"),
    "keep layers, repeated": (header(), "keep layers " + ", ".join(str(i % 100) for i in range(M))),
    "bundle, repeated": (
        header(),
        "drop layers 0..99\nbundle B layers " + ", ".join(str(i % 100) for i in range(M)),
    ),
    "attn drop groups": (
        header(layers=8, heads=65536, kv=65536),
        f"attn layers 0..3 drop groups {EVENS}\n",
    ),
    "moe drop experts": (
        header(layers=8, experts=65536),
        f"moe layers 0..3 drop experts {EVENS}\n",
    ),
}


def _listed(what: str, indices: range, more: int, line: int = 9) -> list[tuple]:
    """P103/P104 as `cap_repeats` folds them: the first five, then `... and N more`."""
    code, text, fold = {
        "twice": ("P103", "layer {} is listed twice", "indices listed twice"),
        "range": (
            "P104",
            "layer {} is out of range: the model has 4096 layers (0..4095)",
            "indices out of range",
        ),
    }[what]
    first = [(code, 1, text.format(i), line) for i in indices]
    assert len(first) == 5
    return [*first, (code, more, f"... and {more:,} more {fold} in this statement", line)]


HETEROGENEOUS = (
    "`expert drop` differs across layers (10000 experts dropped in layers 0..3; 0 experts "
    "dropped in layers 4..7): the result is heterogeneous; stock `from_pretrained` cannot "
    "load it; the report's targets say where it runs (`--format nemotron-nas` for vLLM, "
    "`gguf` for llama.cpp)"
)
# Per statement kind: (code, count, message, line) of every diagnostic, in order.
# drop layers 0, 2, ..., 19998 on 4096 layers: 2048 in range, 7952 out (5 + 7947);
# i % 100 for 10,000 items: 100 first listings, 9900 repeats (5 + 9895).
EXPECTED: dict[str, list[tuple]] = {
    "drop layers, out of range": _listed("range", range(4096, 4106, 2), 10_000 - 2048 - 5),
    "keep layers, repeated": _listed("twice", range(5), 10_000 - 100 - 5),
    "bundle, repeated": _listed("twice", range(5), 10_000 - 100 - 5, line=10),
    "attn drop groups": [],  # 10,000 of 65,536 groups in range, each once
    "moe drop experts": [("W002", 1, HETEROGENEOUS, 9)],
}


@pytest.mark.parametrize("kind", list(STATEMENTS))
def test_check_text_on_10000_index_selections(kind: str) -> None:
    head, body = STATEMENTS[kind]
    result = check_text(head + body + "\n")
    got = [(d.code, d.count, d.message, d.span.line) for d in result.diagnostics]
    assert got == EXPECTED[kind]
    # Every index is accounted for: the folded counts add up to the whole run.
    assert sum(d.count for d in result.diagnostics if d.code in ("P103", "P104")) == {
        "drop layers, out of range": 10_000 - 2048,
        "keep layers, repeated": 10_000 - 100,
        "bundle, repeated": 10_000 - 100,
    }.get(kind, 0)
    assert result.ok == (kind in ("attn drop groups", "moe drop experts"))
    assert (result.resolved is not None) == result.ok
