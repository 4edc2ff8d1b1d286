"""`plangen analyze --target`: every candidate inside the serving target's rules.

The plan the planner writes for a target must check cleanly with
`plancc check --target` for that target (one rule table decides both), its
widths must be the target's granularity with the budget still met, and a
target that cannot run the model is refused before any work.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compiler.check import check_file
from compiler.targets import TARGETS
from plangen.aim import round_widths
from plangen.cli import main as plangen

SMALL = ["--nsamples", "3", "--seqlen", "24", "--heldout", "2", "--batch-size", "2", "--quiet"]


def _model(tmp_path: Path, arch: str = "llama", **config: object) -> Path:
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    return add_char_tokenizer(make_tiny_model(tmp_path, arch, **config))


def _widths(plan: Path) -> list[int]:
    return [int(w) for w in re.findall(r"^mlp layers .* width (\d+)", plan.read_text(), re.M)]


def test_round_widths_rounds_down_then_gives_back_whole_steps_within_the_budget() -> None:
    # Rounding down removes 232 + 132 + 20 = 384 channels more than asked; one step of
    # 256 goes back to the layer that lost most (layer 0), the next would overspend.
    assert round_widths({0: 1000, 1: 900, 2: 1300}, 1536, 256, 0, 10) == {
        0: 1024,
        1: 768,
        2: 1280,
    }
    # What the candidate removed beyond the budget may be given back too.
    assert round_widths({0: 1000, 1: 900, 2: 1300}, 1536, 256, 128 * 10, 10) == {
        0: 1024,
        1: 1024,
        2: 1280,
    }
    # Never below one step, and a layer back at the full width is no longer narrowed.
    assert round_widths({0: 100, 1: 1530}, 1536, 256, 10**9, 1) == {0: 256}


@pytest.mark.parametrize("strategy", ["global", "auto"])
def test_a_vllm_plan_checks_for_vllm_with_widths_in_multiples_of_256(
    strategy: str, tmp_path: Path
) -> None:
    model = _model(tmp_path, num_hidden_layers=4, intermediate_size=1024)
    plan = tmp_path / "plan.prn"
    args = ["--strategy", strategy, "--target", "vllm", "--target-params", "0.75"]
    if strategy == "global":
        args += ["--compensate"]  # a bias vLLM cannot hold: the candidate goes without it
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, *args]) == 0
    text = plan.read_text()
    assert "# target vllm:" in text
    assert "compensate" not in re.sub(r"#.*", "", text)
    widths = _widths(plan)
    assert widths and all(w % 256 == 0 for w in widths)
    result = check_file(plan, target="vllm")
    assert not [d for d in result.diagnostics if d.severity == "error"], result.diagnostics
    # The budget still holds: at most 75% of the parameters are kept.
    assert result.resolved is not None
    from compiler.cost import cost, original

    kept = cost(result.resolved).params / cost(original(result.resolved.facts)).params
    assert kept <= 0.75 + 1e-9


def test_without_a_target_the_same_analysis_keeps_its_own_widths(tmp_path: Path) -> None:
    model = _model(tmp_path, num_hidden_layers=4, intermediate_size=1024)
    plan = tmp_path / "plan.prn"
    args = ["--strategy", "global", "--parts", "mlp", "--target-params", "0.75"]
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, *args]) == 0
    assert any(w % 256 for w in _widths(plan))  # so the vllm test above rounds something
    assert "# target" not in plan.read_text()


@pytest.mark.parametrize(
    ("arch", "target", "message"),
    [
        ("qwen2_moe", "vllm", "does not run the `qwen2_moe` family; targets that do: stock"),
        ("phi3", "llamacpp", "does not run the `phi3` family"),
    ],
)
def test_a_target_that_cannot_run_the_model_is_refused_first(
    arch: str, target: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, arch)
    plan = tmp_path / "plan.prn"
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--target", target]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not plan.exists()


def test_the_target_option_lists_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        plangen(["analyze", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, target in TARGETS.items():
        assert f"{name}: {' '.join(target.what.split())}" in out


def test_a_moe_plan_for_stock_transformers_is_uniform(tmp_path: Path) -> None:
    """MoE candidates are judged by the same table: with --target stock only those one
    config can describe (the same experts count in every MoE layer) are kept."""
    model = _model(tmp_path, "qwen2_moe", num_hidden_layers=3)
    free, plan = tmp_path / "free.prn", tmp_path / "plan.prn"
    assert plangen(["analyze", str(model), "-o", str(free), *SMALL, "--drop-experts", "0.25"]) == 0
    assert "allocated over layers" in free.read_text()  # a per-layer count was judged
    args = ["--drop-experts", "0.25", "--target", "stock"]
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, *args]) == 0
    assert "allocated over layers" not in plan.read_text()  # ... and left out here
    result = check_file(plan, target="stock")
    assert not [d for d in result.diagnostics if d.severity == "error"], result.diagnostics
