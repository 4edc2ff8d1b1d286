"""Issue 33, the compiler's cases, driven through `plancc` as a user runs it:
exit status, the message, and what is left on disk.

9. a very long selection of one repeated index checks, with each problem
   reported once per index and folded after the first five;
11. `plancc diff` compares an edited plan that no longer checks, then says what
   no longer checks; P122's help names the fix for its cause;
12. W006 warns when a plan removes most of the model; W003 suggests only
   widths that are valid.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from compiler.check import check_text
from compiler.facts import validate_facts
from compiler.parse import gc_paused, parse
from compiler.sidecar import layer_decisions
from executor.cli import main
from tests.helpers.plans import FIRST_BODY_LINE as B
from tests.helpers.plans import SMOL_HEADER


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- 9: long selections -------------------------------------------------------------


def test_a_long_repeated_selection_is_reported_per_index_and_folded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 30_000
    text = SMOL_HEADER + "drop layers " + ", ".join(["1"] * n) + "\n"
    plan = _write(tmp_path, "long.prn", text)
    code, out, _ = _run(capsys, "check", str(plan))
    assert code == 1
    p103 = [line for line in out.splitlines() if "error[P103]" in line]
    # The second `1` is at column 16, each next one 3 columns on.
    assert [line.split(":")[2] for line in p103] == ["16", "19", "22", "25", "28", "31"]
    assert p103[-1].endswith(f"... and {n - 1 - 5:,} more indices listed twice in this statement")
    assert out.splitlines()[-1] == f"{plan}: found {n - 1:,} errors (6 listed)"
    assert plan.read_text(encoding="utf-8") == text  # check writes nothing
    assert [p.name for p in tmp_path.iterdir()] == ["long.prn"]


def test_checking_leaves_the_garbage_collector_as_it_found_it() -> None:
    """`check_text` pauses the cyclic collector (what kept long selections linear)
    and must hand it back: enabled if it was, still disabled if it was not."""
    assert gc.isenabled()
    check_text(SMOL_HEADER + "drop layers 1, 1\n")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            check_text(SMOL_HEADER + "drop layers 1\n")
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError), gc_paused():
        1 / 0  # noqa: B018
    assert gc.isenabled()


@pytest.mark.parametrize(
    "body",
    [
        "drop layers 1, " + "9" * 5000 + "\n",
        "mlp layers 1 width " + "9" * 5000 + "\n",
        "calibration builtin samples " + "8" * 5000 + "\n",
    ],
)
def test_a_number_too_long_for_python_is_a_syntax_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    """int() refuses more than 4,300 digits: that was a traceback in check, fmt, diff."""
    text = SMOL_HEADER + body
    plan = _write(tmp_path, "p.prn", text)
    code, out, _ = _run(capsys, "check", str(plan))
    assert code == 1
    assert "error[P001]: number too long (5,000 digits; a plan's numbers have at most 100)" in out
    assert _run(capsys, "fmt", str(plan))[0] == 1
    assert plan.read_text(encoding="utf-8") == text  # fmt refused it: untouched
    old = _write(tmp_path, "old.prn", SMOL_HEADER)
    code, out, err = _run(capsys, "diff", str(old), str(plan))
    assert (code, out) == (2, "") and "does not parse" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.prn", "p.prn"]


def test_a_long_number_in_a_string_or_comment_is_fine() -> None:
    digits = "1" * 5000
    result = check_text(SMOL_HEADER.replace("0000", digits) + f"drop layers 3  # {digits}\n")
    assert result.ok, result.errors


# ---- 11: diff of plans that do not check ---------------------------------------------

ANALYZED_BODY = "mlp layers 4 width 1024 reconstruct\n"


def _analyzed_plan(tmp_path: Path, body: str = ANALYZED_BODY, hidden: int = 576) -> Path:
    """A plan whose sidecar holds layer 4's reconstructed MLP weights, solved for
    `body` (as `plangen analyze --reconstruct` writes them), pinned by sha256."""
    plan_text = SMOL_HEADER + body
    parsed = parse(plan_text).plan
    assert parsed is not None and parsed.model is not None
    facts, _ = validate_facts(parsed.model)
    solved_for = layer_decisions(parsed, facts)
    meta = {"plancc": json.dumps({"reconstruction": {"for": solved_for}})}
    sidecar = tmp_path / "plan.scores.safetensors"
    save_file({"reconstruct.4.mlp": np.zeros((hidden, 1024), np.float32)}, str(sidecar), meta)
    sha = hashlib.sha256(sidecar.read_bytes()).hexdigest()
    scores = f'scores "{sidecar.name}" sha256 "{sha}"\n'
    return _write(tmp_path, "old.prn", SMOL_HEADER + scores + body)


def test_diff_shows_an_edited_width_then_what_no_longer_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _analyzed_plan(tmp_path)
    assert _run(capsys, "check", "--no-cost", str(old))[0] == 0
    new = _write(tmp_path, "new.prn", old.read_text().replace("width 1024", "width 1016"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = _run(capsys, "diff", str(old), str(new))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == "layer 4: mlp width 1024 → 1016"
    assert any(line.startswith("parameters") for line in lines)
    assert "1 layer changed" in lines
    tail = out[out.index(f"{new} no longer checks: 2 errors") :]
    assert "error[P122]" in tail and "error[P124]" in tail
    assert "the weights were solved for another width" in tail
    assert "another model" not in tail  # P122 no longer contradicts P124
    assert tail.count("plangen reconstruct PLAN.prn") == 2
    assert f"{old} " not in tail  # the old plan checks: it is not listed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_p122_still_blames_the_model_when_the_sidecar_is_for_another_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _analyzed_plan(tmp_path, hidden=512)
    code, out, _ = _run(capsys, "check", "--no-cost", str(plan))
    assert code == 1 and "error[P122]" in out
    assert "the sidecar was made for another model: re-run `plangen analyze`" in out


def test_diff_of_two_plans_with_errors_lists_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _write(tmp_path, "old.prn", SMOL_HEADER + "drop layers 3, 40\n")
    new = _write(tmp_path, "new.prn", SMOL_HEADER + "drop layers 40\nmlp layers 3 width 0\n")
    code, out, _ = _run(capsys, "diff", str(old), str(new))
    assert code == 1
    assert out.startswith("layer 3: dropped (bundle B) → kept\n")
    assert f"{old} does not check: 1 error\n" in out
    assert f"{new} does not check: 2 errors\n" in out
    assert out.index(f"{old} does not check") < out.index(f"{new} does not check")


def test_diff_same_meaning_but_new_errors_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _write(tmp_path, "old.prn", SMOL_HEADER + "drop layers 3\n")
    new = _write(tmp_path, "new.prn", SMOL_HEADER + "drop layers 3, 3\n")
    code, out, _ = _run(capsys, "diff", str(old), str(new))
    assert code == 1 and out.startswith("no difference\n\n")
    assert f"{new} no longer checks: 1 error" in out and "error[P103]" in out


def test_diff_without_a_known_architecture_skips_the_cost_delta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _write(tmp_path, "old.prn", SMOL_HEADER)
    new = _write(
        tmp_path, "new.prn", SMOL_HEADER.replace("arch llama", "arch lama") + "drop layers 3\n"
    )
    code, out, _ = _run(capsys, "diff", str(old), str(new))
    assert code == 1
    assert "(no cost delta: a plan does not name a supported architecture)" in out
    assert "error[P010]" in out


def test_diff_reads_a_plan_from_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plancc diff <(git show HEAD:plan.prn) plan.prn`: the old plan is a pipe
    (`/dev/fd/N`, as bash passes it), which can be read once; it was read twice
    and compared as an empty plan (exit 2, "no usable model block")."""
    import os

    read_end, write_end = os.pipe()
    os.write(write_end, (SMOL_HEADER + "drop layers 3\n").encode())
    os.close(write_end)
    new = _write(tmp_path, "new.prn", SMOL_HEADER + "drop layers 4\n")
    try:
        code, out, err = _run(capsys, "diff", f"/dev/fd/{read_end}", str(new))
    finally:
        os.close(read_end)
    assert (code, err) == (1, "")
    assert out.startswith(
        "layer 3: dropped (bundle B) → kept\nlayer 4: kept → dropped (bundle B)\n"
    )


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (SMOL_HEADER + "drop layers 3 x\n", "does not parse"),
        (SMOL_HEADER.replace("  layers 30", ""), "has no usable model block"),
        ("plan 1\ndrop layers 3\n", "has no usable model block"),
    ],
)
def test_diff_refuses_a_plan_with_nothing_to_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, what: str
) -> None:
    old = _write(tmp_path, "old.prn", SMOL_HEADER)
    new = _write(tmp_path, "new.prn", text)
    code, out, err = _run(capsys, "diff", str(old), str(new))
    assert (code, out) == (2, "")
    assert f"plancc: error: {new} {what}, so there is nothing to compare" in err
    assert "error[P" in err  # the reason, as check reports it


# ---- 12: most of the model removed; W003's help ---------------------------------------


def test_dropping_28_of_30_layers_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _write(tmp_path, "p.prn", SMOL_HEADER + "drop layers 0..27\n")
    code, out, _ = _run(capsys, "check", "--no-cost", str(plan))
    assert code == 0  # a warning: the plan is legal
    assert f"{plan}:{B}:1: warning[W006]: the plan drops 28 of 30 layers (93%)" in out
    assert "more than half the layers or half the parameters" in out  # the threshold
    assert out.splitlines()[-1] == f"{plan}: found 1 warning"


@pytest.mark.parametrize(("dropped", "warns"), [(15, False), (16, True)])
def test_w006_fires_above_half_the_layers(dropped: int, warns: bool) -> None:
    result = check_text(SMOL_HEADER + f"drop layers 0..{dropped - 1}\n")
    assert ("W006" in {d.code for d in result.diagnostics}) == warns


def test_w006_counts_parameters_too() -> None:
    result = check_text(SMOL_HEADER + "mlp layers 0..29 width 64\n")
    [w006] = [d for d in result.diagnostics if d.code == "W006"]
    assert w006.message.startswith("the plan removes 57% of the parameters (134,515,008 → ")
    assert result.resolved is not None  # a warning does not stop the plan


def test_every_layer_dropped_is_p107_not_w006() -> None:
    result = check_text(SMOL_HEADER + "drop layers 0..29\n")
    assert "P107" in {d.code for d in result.diagnostics}
    assert "W006" not in {d.code for d in result.diagnostics}


@pytest.mark.parametrize(
    ("width", "help_"),
    [(1, "use 8"), (7, "use 8"), (1001, "use 1000 or 1008"), (1535, "use 1528")],
)
def test_w003_suggests_only_valid_widths(width: int, help_: str) -> None:
    result = check_text(SMOL_HEADER + f"mlp layers 0..29 width {width}\n")
    [w003] = [d for d in result.diagnostics if d.code == "W003"]
    assert w003.help == help_
