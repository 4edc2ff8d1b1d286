"""`plangen analyze` end to end on tiny models, and its strategies against their budgets.

Every emitted plan must pass `plancc check`, apply, and restore bit-exactly;
each strategy must land within one unit (a KV group or an MLP channel; one
channel per layer for the uniform cut) of its parameter target.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from compiler.check import check_file
from compiler.facts import validate_facts
from compiler.parse import parse
from plangen.cli import main as plangen
from plangen.scores import ScoreTables

SMALL = ["--nsamples", "3", "--seqlen", "24", "--heldout", "2", "--batch-size", "2", "--quiet"]


def _model(tmp_path: Path, arch: str, layers: int = 4) -> Path:
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    return add_char_tokenizer(make_tiny_model(tmp_path, arch, num_hidden_layers=layers))


def _analyze(model: Path, plan: Path, *extra: str) -> int:
    return plangen(["analyze", str(model), "-o", str(plan), *SMALL, *extra])


def _apply_and_restore(plan: Path, model: Path, tmp_path: Path) -> None:
    from tests.helpers.outputs import apply_and_restore

    apply_and_restore(plan, model, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_default_plan_checks_applies_and_restores(arch: str, tmp_path: Path, capsys) -> None:
    model = _model(tmp_path, arch)
    plan = tmp_path / "plan.prn"
    assert _analyze(model, plan, "--target-params", "0.8") == 0
    screen = capsys.readouterr().out
    found = re.search(r"lowest held-out loss of (\d) candidates \((\d) finalists\)", screen)
    assert found, screen
    assert int(found[2]) == max(2, math.ceil(int(found[1]) / 2))  # successive halving
    result = check_file(plan)
    assert result.ok, result.errors
    text = plan.read_text()
    assert text.startswith("# written by: plangen analyze ")
    assert "calibration text sha256:" in text and 'scores "plan.scores.safetensors"' in text
    if arch == "gemma3_text":  # one KV group: never an attention statement
        assert "\nattn " not in text
    _apply_and_restore(plan, model, tmp_path)


@pytest.mark.parametrize(
    "strategy",
    [
        ["--strategy", "depth", "--drop", "1"],
        ["--strategy", "depth", "--metric", "angular", "--drop-frac", "0.5"],
        ["--strategy", "depth", "--metric", "removal", "--drop", "2", "--split", "ratio 0.5"],
        ["--strategy", "uniform", "--ratio", "0.5", "--metric", "wanda"],
        ["--strategy", "uniform", "--parts", "mlp", "--metric", "magnitude"],
        ["--strategy", "unbalanced", "--distribution", "2:8", "--freeze-top", "1"],
        ["--strategy", "global", "--metric", "taylor2", "--csv", "units.csv"],
        ["--strategy", "global", "--max-layer-cut", "none", "--remove-empty-layers"],
        ["--strategy", "flap", "--target-params", "0.85"],
        ["--strategy", "uniform", "--metric", "random", "--compensate", "--mlp-layers", "1..9"],
    ],
    ids=lambda s: "-".join(a.strip("-") for a in s[1:4]),
)
def test_every_strategy_writes_a_plan_that_checks_and_applies(
    strategy: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    model = _model(tmp_path, "qwen2")
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "p.prn"
    assert _analyze(model, plan, *strategy) == 0, capsys.readouterr().err
    result = check_file(plan)
    assert result.ok, result.errors
    _apply_and_restore(plan, model, tmp_path)
    if "--csv" in strategy:
        rows = (tmp_path / "units.csv").read_text().splitlines()
        assert rows[0] == "layer,unit,index,metric,score,kept"
        assert len(rows) == 1 + 4 * (2 + 96)
    if "--mlp-layers" in strategy:
        assert "goes past the model's last layer 3: clamped to 1..3" in capsys.readouterr().err


def test_same_inputs_give_identical_bytes_and_scores_replan(tmp_path: Path, capsys) -> None:
    model = _model(tmp_path, "llama")
    plan = tmp_path / "p.prn"
    assert _analyze(model, plan, "--strategy", "global", "--plot") == 0

    def outputs() -> tuple[str, bytes]:  # the command line, quoted first, gains --force
        plan_text = plan.read_text().split("\n", 1)[1]
        return plan_text, (tmp_path / "p.scores.safetensors").read_bytes()

    first = outputs()
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _analyze(model, plan, "--strategy", "global", "--plot", "--force") == 0
    assert outputs() == first
    capsys.readouterr()
    again = tmp_path / "again.prn"
    sidecar = str(tmp_path / "p.scores.safetensors")
    assert _analyze(model, again, "--scores", sidecar, "--strategy", "uniform", "--json") == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == "uniform"
    assert summary["forward_passes"] == pytest.approx(2 * 2 / 3)  # held-out only: no calibration
    assert check_file(again).ok


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calib", "/nonexistent.txt"], "is neither a built-in corpus"),
        (["--nsamples", "100000"], "lower --nsamples or --seqlen"),
        (["--metric", "nope", "--strategy", "global"], "unknown --metric 'nope'"),
        (["--strategy", "uniform", "--attn-layers", "3..1"], "is reversed: write 1..3"),
        (["--strategy", "global", "--max-layer-cut", "2"], "--max-layer-cut: expected a fraction"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(args, message, tmp_path: Path, capsys) -> None:
    model = _model(tmp_path, "llama", layers=2)
    plan = tmp_path / "p.prn"
    assert _analyze(model, plan, *args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_cuda_without_a_gpu_is_a_usage_error_naming_cpu(tmp_path: Path, capsys) -> None:
    """`--device` is checked by argparse (`executor.device`): one line, exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    model = _model(tmp_path, "llama", layers=2)
    with pytest.raises(SystemExit) as exc:
        _analyze(model, tmp_path / "p.prn", "--device", "cuda")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: cuda: no CUDA device is visible here; use --device cpu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


# ---- strategies against their budgets (no model: synthetic scores) ---------------------


def _facts(layers: int = 6, kv: int = 3):
    block = (
        'plan 1\nmodel "m" {\n  arch llama\n'
        f"  layers {layers}  hidden 64  ffn 96  vocab 128  tied true\n"
        f"  heads {3 * kv}  kv_heads {kv}  head_dim 8\n"
        f'  fingerprint "sha256:{"0" * 64}"\n}}\n'
    )
    facts, diags = validate_facts(parse(block).plan.model)
    assert not diags
    return facts


def _scores(facts, seed: int = 0) -> ScoreTables:
    rng = np.random.default_rng(seed)
    tables = {}
    for i in range(facts.layers):
        for m in ("taylor", "flap"):
            tables[f"{m}.{i}.attn"] = rng.random(facts.kv_heads)
            tables[f"{m}.{i}.mlp"] = rng.random(facts.ffn)
    tables["block_influence"] = rng.random(facts.layers)
    return ScoreTables(tables, {})


@pytest.mark.parametrize("keep", [0.9, 0.8, 0.7])
def test_strategies_land_within_one_unit_of_the_target(keep: float) -> None:
    from plangen.strategies import Budget
    from plangen.strategies.global_budget import global_budget
    from plangen.strategies.unbalanced import unbalanced
    from plangen.strategies.uniform import uniform

    facts = _facts()
    scores = _scores(facts)
    b = Budget.of(facts, scores, keep)
    all_layers = list(range(facts.layers))
    for cand, slack in (
        (global_budget(b, "taylor"), b.group_cost),
        (global_budget(b, "flap", rank="score"), b.group_cost),
        (global_budget(b, "taylor", attention=False), b.channel_cost),
        (global_budget(b, "taylor", attention=False, trust=1.25), b.channel_cost),
        (unbalanced(b, "taylor"), b.channel_cost),
        (unbalanced(b, "taylor", attn_fraction=0.2), b.channel_cost),
        (uniform(b, "taylor", [], all_layers), len(all_layers) * b.channel_cost / 2),
        (uniform(b, "taylor", all_layers, all_layers), len(all_layers) * b.channel_cost / 2),
    ):
        assert abs(cand.params(facts) - b.keep_params) <= slack, cand.label


def test_global_budget_removes_the_least_valuable_units_first() -> None:
    from plangen.strategies import Budget
    from plangen.strategies.global_budget import global_budget

    facts = _facts(layers=2)
    scores = _scores(facts)
    scores.tables["taylor.1.mlp"][:] = 1e-9  # layer 1's channels are worthless
    b = Budget.of(facts, scores, 0.95)
    cand = global_budget(b, "taylor", attention=False)
    assert set(cand.mlp_width) == {1}


def test_single_kv_group_models_get_no_attention_cut() -> None:
    from plangen.strategies import Budget
    from plangen.strategies.global_budget import global_budget
    from plangen.strategies.uniform import uniform

    facts = _facts(kv=1)
    b = Budget.of(facts, _scores(facts), 0.8)
    assert not global_budget(b, "taylor").groups_dropped
    with pytest.warns(UserWarning, match="single KV group"):
        assert not uniform(b, "taylor", [0, 1], [0, 1], ratio=0.5).groups_dropped


@pytest.mark.model
@pytest.mark.slow
def test_analyze_check_apply_eval_on_smollm2(smollm2_dir: Path, tmp_path: Path, capsys) -> None:
    """The CLIs end to end on the real model: FLAP at -10% (forward only, small
    calibration) checks against the checkpoint, applies, and stays a language model."""
    import json

    from executor.cli import main as plancc

    plan = tmp_path / "flap.prn"
    args = ["--strategy", "flap", "--target-params", "0.9", "--nsamples", "4", "--seqlen", "128"]
    assert (
        plangen(
            [
                "analyze",
                str(smollm2_dir),
                "-o",
                str(plan),
                "--heldout",
                "2",
                "--quiet",
                "--json",
                *args,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert 0.899 < summary["params_after"] / summary["params_before"] < 0.901
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] + 0.5
    assert plancc(["check", str(plan), "--model", str(smollm2_dir)]) == 0
    out = tmp_path / "out"
    assert plancc(["apply", str(plan), "-o", str(out)]) == 0
    capsys.readouterr()
    assert (
        plancc(["eval", str(smollm2_dir), str(out), "--limit", "2", "--new-tokens", "4", "--json"])
        == 0
    )
    before, after = json.loads(capsys.readouterr().out)["results"]
    assert after["params"] == summary["params_after"]
    assert after["perplexity"] < 1.5 * before["perplexity"]  # FLAP at -10%: about 1.15x


def test_the_trust_region_bounds_every_layers_cut() -> None:
    from plangen.strategies import Budget
    from plangen.strategies.global_budget import global_budget

    facts = _facts(layers=4)
    scores = _scores(facts)
    scores.tables["taylor.3.mlp"][:] = 1e-9  # unbounded, layer 3 would lose everything
    b = Budget.of(facts, scores, 0.9)
    average = b.remove / (4 * b.ffn * b.channel_cost)
    floor = b.ffn - int(1.25 * average * b.ffn)
    free = global_budget(b, "taylor", attention=False)
    assert free.mlp_width[3] < floor  # unbounded, layer 3 pays for everything
    bounded = global_budget(b, "taylor", attention=False, trust=1.25)
    assert bounded.mlp_width[3] == floor  # bounded, it stops at 1.25 x the average cut
    assert min(bounded.mlp_width.values()) >= floor
    assert abs(bounded.params(facts) - b.keep_params) <= b.channel_cost


def test_a_candidate_measured_in_place_is_the_applied_model(tmp_path: Path) -> None:
    """Zeroing what a candidate removes gives the logits of the model apply writes, and
    the weights come back bit for bit afterwards."""
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from executor.apply import apply_plan
    from executor.loader import load
    from plangen import emit
    from plangen.analyze import model_facts
    from plangen.candidate import Candidate
    from plangen.scores import write_sidecar
    from plangen.surgery import applied

    model_dir = _model(tmp_path, "qwen2")
    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    scores = _scores(facts)
    for i in range(facts.layers):
        scores.tables[f"mean_in.{i}.mlp"] = np.linspace(-1, 1, facts.ffn)
        scores.tables[f"mean_in.{i}.attn"] = np.linspace(1, -1, facts.heads * facts.head_dim)
    cand = Candidate(
        "global",
        "test",
        drop=(2,),
        groups_dropped={1: (0,)},
        mlp_width={0: 50, 3: 70},
        metric="taylor",
        compensate=True,
    )
    sidecar = tmp_path / "s.scores.safetensors"
    header = emit.Header(
        ck.model_block(),
        str(model_dir),
        sidecar.name,
        write_sidecar(sidecar, scores),
        "builtin samples 1 seqlen 8 seed 0",
        ["test"],
    )
    plan = tmp_path / "s.prn"
    plan.write_text(emit.plan_text(cand, header, scores, facts.ffn))
    apply_plan(plan, tmp_path / "out")
    pruned = load(tmp_path / "out" / "A", "cpu", torch.float32)
    model = load(model_dir, "cpu", torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(model, ck.arch, facts, cand, scores):
        masked = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(masked, pruned(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_auto_judges_reconstructed_candidates_and_writes_the_lowest(tmp_path: Path, capsys) -> None:
    import json

    model = _model(tmp_path, "llama")
    plan = tmp_path / "auto.prn"
    assert _analyze(model, plan, "--target-params", "0.8", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    labels = [c["label"] for c in summary["candidates"]]
    assert sum("reconstructed" in x for x in labels) == 3, labels
    assert sum("compensated" in x for x in labels) >= 3, labels
    finalists = [c for c in summary["candidates"] if c["heldout_loss"] is not None]
    best = min(finalists, key=lambda c: c["heldout_loss"])
    assert summary["label"] == best["label"]
    assert summary["heldout_loss_after"] == best["heldout_loss"]
    assert "reconstruct" in summary["phases_s"]
    text = plan.read_text()
    assert f"# chosen: {best['label']}" in text
    for c in summary["candidates"]:  # every candidate judged, listed with its loss
        loss = (
            c["heldout_loss"] if c["heldout_loss"] is not None else c["heldout_loss_first_window"]
        )
        assert f"#   {loss:.4f}" in text and c["label"] in text
    result = check_file(plan)
    assert result.ok, result.errors
    _apply_and_restore(plan, model, tmp_path)
