"""Every diagnostic code: a plan that triggers it, and the exact line and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.check import check_text
from compiler.diagnostics import CODES, cap_repeats, error, render_json, render_text, summary_line
from compiler.ir import Span
from tests.helpers.plans import FIRST_BODY_LINE as B
from tests.helpers.plans import FIRST_MOE_LINE as M
from tests.helpers.plans import MOE_HEADER, SMOL_HEADER

# DeepSeek-V3's real shape (671B parameters; statements start on line 11).
DEEPSEEK_HEADER = """\
plan 1
model "DeepSeek-V3" {
  arch deepseek_v3
  layers 61  hidden 7168  ffn 18432  vocab 129280  tied false
  heads 128  kv_heads 128  head_dim 56
  q_lora 1536  kv_lora 512  rope_dim 64  nope_dim 128  v_dim 128
  experts 256  top_k 8  expert_ffn 2048  shared_ffn 2048  expert_groups 8
  dense_layers 0..2
  fingerprint "sha256:0000"
}
"""

# (code, plan text, line, column, words the message must contain)
CASES: list[tuple[str, str, int, int, str]] = [
    ("P001", SMOL_HEADER + "drop layers 3..\n", B, 16, "expected an integer"),
    ("P001", SMOL_HEADER + "mlp layers 3 width -5\n", B, 20, "unexpected character `-`"),
    ("P002", SMOL_HEADER + "prune layers 3\n", B, 1, "unknown statement `prune`"),
    ("P003", SMOL_HEADER + "mlp layers 3 wdth 512\n", B, 14, "unknown keyword `wdth`"),
    ("P003", SMOL_HEADER.replace("  arch llama", "  arch llama\n  colour 3"), 4, 3, "`colour`"),
    ("P004", SMOL_HEADER.replace("plan 1", "plan 2"), 1, 6, "version 2"),
    ("P005", SMOL_HEADER.replace("plan 1\n", ""), 1, 1, "`plan` version line"),
    ("P006", "plan 1\ndrop layers 3\n", 1, 6, "no `model"),
    ("P007", SMOL_HEADER + 'model "x" {\n  arch llama\n}\n', B, 1, "`model` is stated twice"),
    ("P008", SMOL_HEADER + 'source "a"\nsource "b"\n', B + 1, 1, "`source` is stated twice"),
    ("P009", SMOL_HEADER.replace("tied true", "tied true  hidden 5"), 4, 60, "`hidden`"),
    ("P010", SMOL_HEADER.replace("arch llama", "arch gpt9"), 3, 8, "unknown architecture"),
    ("P011", SMOL_HEADER.replace("heads 9", "heads nine"), 5, 9, "`heads` must be"),
    ("P011", SMOL_HEADER.replace("kv_heads 3", "kv_heads 4"), 5, 21, "not a multiple"),
    ("P101", SMOL_HEADER + "moe layers 3 drop experts 1\n", B, 1, "`experts`"),
    ("P102", SMOL_HEADER + "drop layers 9..3\n", B, 13, "reversed"),
    ("P103", SMOL_HEADER + "drop layers 3..5, 4\n", B, 19, "layer 4 is listed twice"),
    ("P104", SMOL_HEADER + "drop layers 31\n", B, 13, "layer 31 is out of range"),
    ("P104", SMOL_HEADER + "attn layers 1 drop groups 3\n", B, 27, "group 3"),
    ("P104", MOE_HEADER + "moe layers 1 drop experts 16\n", M, 27, "expert 16"),
    # A lone integer out of range in the model block points at the fact's value (it had
    # no position: line 0, found by test_properties' mutations).
    (
        "P104",
        MOE_HEADER.replace("  dense_layers 5\n", "  dense_layers 15\n"),
        9,
        16,
        "dense_layers 15..15 is outside 0..5",
    ),
    (
        "P105",
        SMOL_HEADER + "mlp layers 5 width 512\nmlp layers 4..6 width 1024\n",
        B + 1,
        12,
        "already has a `mlp width` decision on line 8",
    ),
    ("P105", SMOL_HEADER + "drop layers 5\ndrop layers 5\n", B + 1, 13, "line 8"),
    ("P106", SMOL_HEADER + "drop layers 5\nmlp layers 5 width 512\n", B + 1, 12, "dropped layer 5"),
    ("P107", SMOL_HEADER + "drop layers 0..29\n", B, 13, "every layer is dropped"),
    (
        "P108",
        SMOL_HEADER + "keep layers 0, 29\ndrop layers 20..29\n",
        B + 1,
        13,
        "guarded by `keep layers`",
    ),
    ("P109", SMOL_HEADER + "attn layers 4 drop groups 0..2\n", B, 27, "all 3 KV groups"),
    ("P110", SMOL_HEADER + "mlp layers 4 width 0\n", B, 20, "outside 1..1536"),
    ("P110", SMOL_HEADER + "mlp layers 4 width 2048\n", B, 20, "outside 1..1536"),
    ("P111", MOE_HEADER + "moe layers 0 drop experts 0..14\n", M, 27, "fewer than top_k 2"),
    ("P112", MOE_HEADER + "moe layers 0 drop experts 3\n", M, 27, "not divisible"),
    (
        "P112",
        MOE_HEADER + "moe layers 0 drop experts 0..3\n",
        M,
        27,
        "would become unequal: group 0 (experts 0..3) loses 4, group 1 (experts 4..7) loses 0",
    ),
    ("P113", SMOL_HEADER + "drop layers 5\nbundle B layers 5, 6\n", B + 1, 17, "not dropped"),
    (
        "P114",
        SMOL_HEADER + "drop layers 5..6\nbundle B layers 5..6\nbundle C layers 6\n",
        B + 2,
        17,
        "already in bundle B",
    ),
    (
        "P115",
        SMOL_HEADER + "drop layers 5..6\nbundle B layers 5\n",
        B + 1,
        1,
        "layer 6 is in no bundle",
    ),
    (
        "P116",
        SMOL_HEADER + "drop layers 5..6\nbundle B layers 5\nbundle B layers 6\n",
        B + 2,
        8,
        "declared twice",
    ),
    ("P117", MOE_HEADER + "mlp layers 0 width 256\n", M, 12, "mixture-of-experts"),
    ("P117", MOE_HEADER + "moe layers 5 experts width 64\n", M, 12, "dense"),
    ("P120", SMOL_HEADER + "mlp layers 4 width 1024 by taylor\n", B, 28, "needs a scores sidecar"),
    (
        "P125",
        SMOL_HEADER + "mlp layers 4 width 1024 compensate reconstruct\n",
        B,
        25,
        "already fits",
    ),
    (
        "P126",
        DEEPSEEK_HEADER + "attn layers 3 drop groups 1\n",
        11,
        1,
        "multi-head latent attention, which is kept whole",
    ),
    ("W001", SMOL_HEADER + "drop layers 29\n", B, 13, "last layer"),
    ("W002", SMOL_HEADER + "mlp layers 4..6 width 1024\n", B, 12, "heterogeneous"),
    ("W003", SMOL_HEADER + "mlp layers 0..29 width 1001\n", B, 24, "multiple of 8"),
    ("W004", SMOL_HEADER + "mlp layers 0..29 width 1536\n", B, 24, "changes nothing"),
    ("W005", SMOL_HEADER.replace('  fingerprint "sha256:0000"\n', ""), 2, 1, "no fingerprint"),
    ("W006", SMOL_HEADER + "keep layers 0\ndrop layers 1..28\n", B + 1, 1, "drops 28 of 30"),
    ("W006", SMOL_HEADER + "mlp layers 0..29 width 64\n", B, 1, "removes 57% of the parameters"),
]


@pytest.mark.parametrize(("code", "text", "line", "col", "words"), CASES)
def test_code_line_column(code: str, text: str, line: int, col: int, words: str) -> None:
    result = check_text(text)
    hits = [d for d in result.diagnostics if d.code == code]
    assert hits, f"no {code}; got {[(d.code, d.message) for d in result.diagnostics]}"
    assert any((d.span.line, d.span.col) == (line, col) for d in hits), [
        (d.span.line, d.span.col, d.message) for d in hits
    ]
    assert any(words in d.message for d in hits), [d.message for d in hits]


# Serving-target rules (`check --target`): (code, target, plan text, line, column, words).
TARGET_CASES: list[tuple[str, str, str, int, int, str]] = [
    ("P140", "stock", SMOL_HEADER + "mlp layers 4..6 width 1024\n", B, 12, "differs across"),
    (
        "P142",
        "stock",
        SMOL_HEADER.replace("hidden 576", "hidden 64").replace(
            "heads 9  kv_heads 3", "heads 8  kv_heads 4"
        )
        + "attn layers 0..29 drop groups 3\n",
        B,
        13,
        "LlamaConfig refuses it",
    ),
    (
        "P143",
        "vllm",
        SMOL_HEADER.replace("arch llama", "arch phi3") + "mlp layers 4 width 1024\n",
        3,
        8,
        "cannot take `phi3` results",
    ),
    ("P144", "llamacpp", MOE_HEADER, 3, 8, "mixture-of-experts"),
    ("P145", "vllm", SMOL_HEADER + "attn layers 3 drop groups 1\n", B, 13, "query-head count"),
    ("P146", "vllm", SMOL_HEADER + "mlp layers 4..6 width 1000\n", B, 23, "multiple of 256"),
]


@pytest.mark.parametrize(("code", "target", "text", "line", "col", "words"), TARGET_CASES)
def test_target_code_line_column(
    code: str, target: str, text: str, line: int, col: int, words: str
) -> None:
    assert code not in {d.code for d in check_text(text).diagnostics}  # only with --target
    result = check_text(text, target=target)
    [d] = result.errors
    assert (d.code, d.span.line, d.span.col) == (code, line, col), d
    assert words in d.message and d.help


def test_every_code_is_tested() -> None:
    # P124 (stale reconstruction) needs a solved sidecar: tests/plangen/test_reconstruct.py.
    # P127 (sidecar measured on other weights) and P132 (`check --model` of other
    # weights): tests/plangen/test_planner_hardening.py.
    # P141 (`compensate` on a target) needs a sidecar: tests/compiler/test_targets.py.
    tested = {c[0] for c in CASES} | {c[0] for c in TARGET_CASES}
    tested |= {"P121", "P122", "P123", "P124", "P127", "P130", "P131", "P132", "P141"}
    assert tested == set(CODES)


def write_sidecar(path: Path, tables: dict[str, tuple[int, ...]]) -> str:
    import hashlib

    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v) for k, v in tables.items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sidecar_codes(tmp_path: Path) -> None:
    sha = write_sidecar(tmp_path / "s.safetensors", {"taylor.4.mlp": (1536,), "wanda.4.mlp": (7,)})
    head = SMOL_HEADER + f'scores "s.safetensors" sha256 "{sha}"\n'
    ok = check_text(head + "mlp layers 4 width 1024 by taylor\n", base_dir=tmp_path)
    assert ok.ok, ok.diagnostics
    missing = check_text(head + "mlp layers 4..5 width 1024 by taylor\n", base_dir=tmp_path)
    [d] = [d for d in missing.diagnostics if d.is_error]
    assert (d.code, d.span.line, d.span.col) == ("P120", B + 1, 31)
    assert "taylor.5.mlp" in d.message
    shape = check_text(head + "mlp layers 4 width 1024 by wanda\n", base_dir=tmp_path)
    [d] = [d for d in shape.diagnostics if d.is_error]
    assert (d.code, d.span.line) == ("P122", B + 1)
    assert "[7]" in d.message and "[1536]" in d.message
    comp = check_text(head + "mlp layers 4 width 1024 compensate\n", base_dir=tmp_path)
    assert [d.code for d in comp.diagnostics if d.is_error] == ["P120"]
    assert "mean_in.4.mlp" in comp.errors[0].message
    wrong = SMOL_HEADER + 'scores "s.safetensors" sha256 "abc"\n'
    bad = check_text(wrong + "mlp layers 4 width 1024 by taylor\n", base_dir=tmp_path)
    [d] = [d for d in bad.diagnostics if d.is_error]
    assert (d.code, d.span.line, d.span.col) == ("P121", B, 31)
    gone = SMOL_HEADER + 'scores "nope.safetensors" sha256 "abc"\n'
    absent = check_text(gone + "mlp layers 4 width 1024 by taylor\n", base_dir=tmp_path)
    [d] = [d for d in absent.diagnostics if d.is_error]
    assert (d.code, d.span.line, d.span.col) == ("P123", B, 8)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    corrupt = SMOL_HEADER + 'scores "bad.safetensors" sha256 "abc"\n'
    result = check_text(corrupt + "mlp layers 4 width 1024 by taylor\n", base_dir=tmp_path)
    assert [d.code for d in result.diagnostics if d.is_error] == ["P123"]


def test_checkpoint_mismatch_codes() -> None:
    real = {
        "arch": "llama",
        "layers": 30,
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "ffn": 1536,
        "vocab": 49152,
        "tied": True,
        "fingerprint": "sha256:0000",
    }
    assert check_text(SMOL_HEADER, checkpoint=real).ok
    other = dict(real, ffn=2048, fingerprint="sha256:1111")
    result = check_text(SMOL_HEADER, checkpoint=other)
    got = {(d.code, d.span.line, d.span.col) for d in result.diagnostics if d.is_error}
    assert got == {("P130", 4, 30), ("P131", 6, 15)}
    assert "plan 1536, checkpoint 2048" in result.errors[0].message


def test_all_problems_in_one_run() -> None:
    text = SMOL_HEADER + "drop layers 31\nmlp layers 2 width 0\nfrob\nattn layers 1 drop groups 9\n"
    syntax = check_text(text)
    assert [d.code for d in syntax.diagnostics] == ["P002"]  # syntax first, all of them
    text = text.replace("frob\n", "")
    result = check_text(text)
    assert [(d.code, d.span.line) for d in result.diagnostics] == [
        ("P104", B),
        ("W002", B + 1),
        ("P110", B + 1),
        ("P104", B + 2),
    ]


def test_every_syntax_error_reported() -> None:
    text = SMOL_HEADER + "drop layers\nfrob 3\nmlp layers 1 width\nkeep layers 1\n"
    result = check_text(text)
    assert [(d.code, d.span.line) for d in result.diagnostics] == [
        ("P001", B),
        ("P002", B + 1),
        ("P001", B + 2),
    ]


def test_rendered_text_has_caret_and_help() -> None:
    text = SMOL_HEADER + "drop layers 31\n"
    result = check_text(text)
    out = render_text(result.diagnostics, "plan.prn", text)
    assert out.splitlines() == [
        "plan.prn:8:13: error[P104]: layer 31 is out of range: the model has 30 layers (0..29)",
        "   8 | drop layers 31",
        "     |             ^^",
    ]
    result = check_text(SMOL_HEADER + "mlp layers 3 wdth 5\n")
    out = render_text(result.diagnostics, "p.prn", SMOL_HEADER + "mlp layers 3 wdth 5\n")
    assert out.splitlines()[-1] == "  = help: did you mean `width`?"


def test_w002_judges_resulting_shapes_not_statements() -> None:
    split_but_uniform = SMOL_HEADER + "mlp layers 0..14 width 1024\nmlp layers 15..29 width 1024\n"
    assert not check_text(split_but_uniform).diagnostics
    other_groups = (
        SMOL_HEADER + "attn layers 0..14 drop groups 0\nattn layers 15..29 drop groups 2\n"
    )
    assert not check_text(other_groups).diagnostics  # same count dropped: same shapes
    depth_only = SMOL_HEADER + "drop layers 4..5\nmlp layers 0..3, 6..29 width 1024\n"
    assert not check_text(depth_only).diagnostics  # dropped layers have no shape
    mixed = SMOL_HEADER + "mlp layers 0..14 width 1024\nmlp layers 15..29 width 512\n"
    [d] = check_text(mixed).diagnostics
    assert d.code == "W002" and (d.span.line, d.span.col) == (B, 12)
    assert "(width 1024 in layers 0..14; width 512 in layers 15..29)" in d.message


# ---- many problems of one kind in one statement ----------------------------------------


def test_repeated_diagnostics_are_capped_per_statement() -> None:
    indices = ", ".join(str(30 + 2 * i) for i in range(10_000))  # 10,000 out of range
    text = SMOL_HEADER + f"drop layers {indices}\ndrop layers 40, 41, 42\n"
    result = check_text(text)
    first = [d for d in result.diagnostics if d.span.line == B]
    assert [d.code for d in first] == ["P104"] * 6
    assert [d.count for d in first] == [1, 1, 1, 1, 1, 9_995]
    assert [d.span.col for d in first[:2]] == [13, 17]
    assert first[0].message == "layer 30 is out of range: the model has 30 layers (0..29)"
    assert first[-1].message == "... and 9,995 more indices out of range in this statement"
    assert first[-1].span.col == 33  # at the first index left out: `40`
    # the second statement has its own problems, listed in full
    assert [(d.code, d.span.line) for d in result.diagnostics[6:]] == [("P104", B + 1)]
    assert summary_line(list(result.diagnostics)) == "found 10,001 errors (7 listed)"
    rows = [json.loads(r) for r in render_json(result.diagnostics, "p.prn").splitlines()]
    assert len(rows) == 7 and rows[5]["count"] == 9_995 and "count" not in rows[0]
    rendered = render_text(result.diagnostics, "p.prn", text)
    assert max(len(line) for line in rendered.splitlines()) < 200  # a window, not 60 kB


def test_cap_folds_only_long_runs_of_one_code() -> None:
    six = SMOL_HEADER + "drop layers " + ", ".join(str(30 + 2 * i) for i in range(6)) + "\n"
    assert [d.count for d in check_text(six).diagnostics] == [1] * 6  # 6: nothing to hide
    seven = six[:-1] + ", 99\n"
    diags = check_text(seven).diagnostics
    assert [d.count for d in diags] == [1] * 5 + [2]
    assert diags[-1].message == "... and 2 more indices out of range in this statement"
    mixed = SMOL_HEADER + "keep layers " + ", ".join(["3", "3"] * 4 + ["40", "42"]) + "\n"
    diags = check_text(mixed).diagnostics  # 7 repeats of layer 3, 2 indices out of range
    assert [(d.code, d.count) for d in diags] == [("P103", 1)] * 5 + [("P103", 2)] + [
        ("P104", 1),
        ("P104", 1),
    ]


def test_cap_repeats_is_one_mechanism() -> None:
    diags = [error("P110", f"width {i}", Span(3, i + 1, 3, i + 2)) for i in range(20)]
    diags += [error("P110", "width x", Span(4, 1, 4, 2))]
    capped = cap_repeats(diags, limit=3)
    assert [d.message for d in capped[:3]] == ["width 0", "width 1", "width 2"]
    assert capped[3].count == 17 and capped[3].span == Span(3, 4, 3, 5)
    assert "17 more `P110` problems (width out of range)" in capped[3].message
    assert capped[4].message == "width x"
    assert summary_line(capped) == "found 21 errors (5 listed)"


def test_form_feed_in_a_string_keeps_lines_in_diagnostics() -> None:
    """Lines are counted on \\n only (as the parser counts them) when rendering."""
    text = SMOL_HEADER.replace('"sha256:0000"', '"sha256:\f\u2028"') + "drop layers 31\n"
    result = check_text(text)
    [d] = result.diagnostics
    assert (d.code, d.span.line) == ("P104", B)
    assert render_text([d], "p.prn", text).splitlines()[1] == "   8 | drop layers 31"
    syntax = check_text(text.replace("drop layers 31", "drop layers -1"))
    [d] = syntax.diagnostics
    assert (d.code, d.span.line, d.span.col) == ("P001", B, 13)
    assert d.message == "unexpected character `-`"


def test_many_syntax_errors_are_all_found() -> None:
    """After a syntax error the parse resumes after the statements that parsed (it
    started over from the top, so a plan with an error every other line took minutes)."""
    body = "".join(f"drop layers {i}  # ok\nmlp layers {i} width -1\n" for i in range(800))
    result = check_text(SMOL_HEADER + body)  # restarting from the top took about 35 s
    assert len(result.diagnostics) == 800
    assert {(d.code, d.message) for d in result.diagnostics} == {
        ("P001", "unexpected character `-`")
    }
    assert [(d.span.line, d.span.col) for d in result.diagnostics[:2]] == [(B + 1, 20), (B + 3, 20)]
    assert result.diagnostics[-1].span.line == B + 1599
