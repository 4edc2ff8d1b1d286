"""The `plancc` and `plangen` programs as a user runs them: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from executor.cli import main as plancc
from tests.helpers.paths import EXAMPLES
from tests.helpers.plans import SMOL_HEADER


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = plancc(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_clean_prints_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", str(EXAMPLES / "smollm2-depth.prn"))
    assert code == 0
    assert "smollm2-depth.prn: no problems found" in out
    assert "parameters                 134,515,008     113,274,432    -15.8%" in out
    assert "KV cache bytes/token            23,040          18,432    -20.0%" in out
    assert "   21     -  dropped → bundle B" in out
    assert "   27    21      9/9      3/3    1536/1536" in out
    assert "result: uniform: stock AutoModelForCausalLM.from_pretrained loads it" in out


def test_check_errors_exit_1_with_all_diagnostics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write(tmp_path, "p.prn", SMOL_HEADER + "drop layers 31\nmlp layers 3 width 0\n")
    code, out, _ = run(capsys, "check", str(plan))
    assert code == 1
    assert f"{plan}:8:13: error[P104]" in out
    assert f"{plan}:9:20: error[P110]" in out
    assert "found 2 errors and 1 warning" in out
    assert "cost of" not in out  # no report for an invalid plan


def test_check_warnings_only_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = write(tmp_path, "p.prn", SMOL_HEADER + "drop layers 29\n")
    code, out, _ = run(capsys, "check", str(plan))
    assert code == 0 and "warning[W001]" in out


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = write(tmp_path, "p.prn", SMOL_HEADER + "drop layers 31\n")
    code, out, _ = run(capsys, "check", "--format", "json", str(plan))
    assert code == 1
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row == {
        "path": str(plan),
        "line": 8,
        "column": 13,
        "end_line": 8,
        "end_column": 15,
        "severity": "error",
        "code": "P104",
        "message": "layer 31 is out of range: the model has 30 layers (0..29)",
        "help": None,
    }
    code, out, _ = run(capsys, "check", "--format", "json", str(EXAMPLES / "smollm2-mlp.prn"))
    report = json.loads(out.splitlines()[-1])["report"]
    assert report["after"]["params"] == 107_972_928 and report["stock_loadable"] is True


def test_check_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "missing.prn"))
    assert code == 2 and "missing.prn: no such file" in err
    (tmp_path / "bin.prn").write_bytes(b"\xff\xfe")
    code, _, err = run(capsys, "check", str(tmp_path / "bin.prn"))
    assert code == 2 and "not UTF-8" in err
    code, _, err = run(capsys, "check", str(EXAMPLES / "smollm2-mlp.prn"), "--model", "/nope")
    assert code == 2 and "/nope" in err
    with pytest.raises(SystemExit) as exc:
        plancc(["check"])
    assert exc.value.code == 2


def test_check_model_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model
) -> None:
    model = tiny_model("llama")
    code, out, _ = run(capsys, "check", str(EXAMPLES / "smollm2-mlp.prn"), "--model", str(model))
    assert code == 1
    assert "error[P131]: fingerprint disagrees with the checkpoint" in out
    assert "error[P130]: `layers` disagrees with the checkpoint: plan 30, checkpoint" in out


def test_fmt_rewrites_and_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messy = SMOL_HEADER + "mlp layers 5,4,3 width 1024 by magnitude  # why\ndrop layers 20\n"
    plan = write(tmp_path, "p.prn", messy)
    code, out, _ = run(capsys, "fmt", "--check", str(plan))
    assert (code, out.strip()) == (1, f"would reformat {plan}")
    assert plan.read_text() == messy
    code, out, _ = run(capsys, "fmt", str(plan))
    assert code == 0 and plan.read_text().endswith(
        "\ndrop layers 20\n\nmlp layers 3..5 width 1024  # why\n"
    )
    assert run(capsys, "fmt", "--check", str(plan))[0] == 0
    bad = write(tmp_path, "bad.prn", SMOL_HEADER + "drop layers\n")
    code, _, err = run(capsys, "fmt", str(bad))
    assert code == 1 and "error[P001]" in err and "fix the syntax errors first" in err
    assert bad.read_text() == SMOL_HEADER + "drop layers\n"


def test_examples_are_formatted(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.prn"))
    assert run(capsys, "fmt", "--check", *files)[0] == 0


def test_diff_semantic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.prn", SMOL_HEADER + "drop layers 20, 21\nmlp layers 3..4 width 1024\n")
    b = write(
        tmp_path,
        "b.prn",
        SMOL_HEADER + "# same model, other words\nmlp layers 4, 3 width 1024 by magnitude\n"
        "mlp layers 5 width 1536\ndrop layers 20..21\nbundle B layers 20\nbundle C layers 21\n",
    )
    code, out, _ = run(capsys, "diff", str(a), str(b))
    assert (code, out) == (0, "no difference\n")
    c = write(tmp_path, "c.prn", SMOL_HEADER + "drop layers 20\nmlp layers 3..4 width 512\n")
    code, out, _ = run(capsys, "diff", str(a), str(c))
    assert code == 1
    lines = out.splitlines()
    assert lines[:3] == [
        "layer 3: mlp width 1024 → 512",
        "layer 4: mlp width 1024 → 512",
        "layer 21: dropped (bundle C) → kept",
    ]
    assert lines[-1] == "3 layers changed"
    assert any(line.startswith("parameters") and "+1.4%" in line for line in lines)


def test_diff_plan_with_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plan with errors is still compared; its errors follow the difference (issue 33)."""
    a = write(tmp_path, "a.prn", SMOL_HEADER)
    b = write(tmp_path, "b.prn", SMOL_HEADER + "drop layers 20, 99\n")
    code, out, _ = run(capsys, "diff", str(a), str(b))
    assert code == 1 and out.startswith("layer 20: kept → dropped")
    assert f"{b} no longer checks: 1 error" in out and "error[P104]" in out


def test_diff_unparsable_plan_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.prn", SMOL_HEADER)
    b = write(tmp_path, "b.prn", SMOL_HEADER + "drop layers 99 x\n")
    code, out, err = run(capsys, "diff", str(a), str(b))
    assert (code, out) == (2, "") and "error[P001]" in err and "does not parse" in err


def test_console_scripts_run() -> None:
    """The installed entry points answer --help (what a user types first)."""
    bindir = Path(sys.executable).parent
    for tool in ("plancc", "plangen"):
        out = subprocess.run([bindir / tool, "--help"], capture_output=True, text=True, check=True)
        assert "usage:" in out.stdout
