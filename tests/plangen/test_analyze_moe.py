"""`plangen analyze` on mixture-of-experts models: router statistics, expert drops.

Tiny random models of every MoE family run the whole pipeline (analyze -> check
-> apply -> load -> restore); the trained Qwen2-MoE fixture checks that the
statistics mean what they say (a measured ranking reproduces the issue's
numbers, and the default drop plan rescales, applies and evaluates; how it compares
with the single scores is `benchmarks/moe_peers.py`'s).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compiler.check import check_file
from plangen.cli import main as plangen

SMALL = ["--nsamples", "3", "--seqlen", "24", "--heldout", "2", "--batch-size", "2", "--quiet"]


# 8 query heads in 4 KV groups of 8 dims: enough groups for the budget to try dropping one.
FOUR_GROUPS = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}


def _model(tmp_path: Path, arch: str) -> Path:
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    return add_char_tokenizer(make_tiny_model(tmp_path, arch))


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_drop_experts_plan_checks_applies_and_restores(arch: str, tmp_path: Path, capsys) -> None:
    from tests.helpers.outputs import apply_and_restore

    model = _model(tmp_path, arch)
    plan = tmp_path / "plan.prn"
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--drop-experts", "0.5"]) == 0
    screen = capsys.readouterr().out
    found = re.search(r"lowest held-out loss of (\d+) candidates", screen)
    assert found and int(found[1]) >= 2, screen
    result = check_file(plan)
    assert result.ok, result.errors
    assert result.resolved is not None
    kept = [lp.experts_kept for lp in result.resolved.kept if lp.moe]
    if arch == "deepseek_v3":  # 8 experts in 2 routing groups, layer 0 dense
        assert len(kept) == 1 and len(kept[0]) == 4
        assert sum(e < 4 for e in kept[0]) == 2  # two from each group
    else:
        assert [len(k) for k in kept] == [2, 2]  # 4 experts, half dropped, top_k 2 kept
    text = plan.read_text()
    assert "# held-out loss of the original" in text
    assert text.count("\nmoe layers ") == len(kept)
    apply_and_restore(plan, model, tmp_path)


def test_router_statistics_are_exact_on_a_hand_checked_case(tmp_path: Path) -> None:
    """Frequency, routing weight and router probability against the router's own
    outputs recomputed in the test; REAP against each expert's output norm."""
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from executor.loader import load
    from plangen.metrics.router import collect_router
    from plangen.surgery import moe_modules

    model_dir = _model(tmp_path, "qwen2_moe")
    model = load(model_dir, "cpu", torch.float32)
    layers = model.model.layers
    windows = [list(range(3, 27)), list(range(30, 54))]
    arch = load_checkpoint_facts(model_dir).arch
    stats = collect_router(model, arch, [0, 1], 4, windows, batch_size=2, progress=False)
    seen: list[torch.Tensor] = []
    mods = moe_modules(layers[1], 4)
    assert mods is not None
    handle = mods.block.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model.base_model(input_ids=torch.tensor(windows), use_cache=False)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    with torch.no_grad():
        logits, weights, index = mods.router(x)
    probs = torch.softmax(logits.double(), dim=-1)
    tables = stats[1].tables()
    n = x.shape[0]
    freq = np.array([(index == e).sum().item() / n for e in range(4)])
    weight = np.array([weights[index == e].double().sum().item() / n for e in range(4)])
    np.testing.assert_allclose(tables["frequency"], freq, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tables["routing_weight"], weight, rtol=1e-6)
    np.testing.assert_allclose(tables["router_prob"], probs.mean(0).numpy(), rtol=1e-5)
    e = int(np.argmax(freq))
    rows, pos = torch.where(index == e)
    with torch.no_grad():
        h = mods.experts.act_fn
        gate, up = (x[rows] @ mods.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        out = (h(gate) * up) @ mods.experts.down_proj[e].T
    reap = float((weights[rows, pos].double() * out.double().norm(dim=-1)).mean())
    assert tables["reap"][e] == pytest.approx(reap, rel=1e-5)


def test_moe_refuses_dense_size_options(tmp_path: Path, capsys) -> None:
    model = _model(tmp_path, "qwen2_moe")
    plan = tmp_path / "p.prn"
    code = plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--ratio", "0.2"])
    assert code == 2
    assert "--ratio on a mixture-of-experts model" in capsys.readouterr().err
    both = ["--target-params", "0.8", "--shrink-experts", "0.25"]
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, *both]) == 2
    assert "give the budget alone" in capsys.readouterr().err
    assert not plan.exists()


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_target_params_budgets_expert_drops_and_width(arch: str, tmp_path: Path, capsys) -> None:
    """`--target-params` on a MoE model: candidates along the split between expert drops
    and expert width, every one within the budget; the plan checks at that size, applies
    and restores."""
    from compiler.checkpoint import load_checkpoint_facts
    from compiler.cost import cost
    from plangen.analyze import model_facts
    from plangen.candidate import original_params
    from tests.helpers.outputs import apply_and_restore

    model = _model(tmp_path, arch)
    plan = tmp_path / "plan.prn"
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--target-params", "0.8"]) == 0
    capsys.readouterr()
    text = plan.read_text()
    listed = [line for line in text.splitlines() if line.startswith("#   ")]
    assert len([line for line in listed if "budget:" in line]) >= 3, text
    assert any("experts width" in line and "dropped" in line for line in listed), text
    result = check_file(plan)
    assert result.ok, result.errors
    facts = model_facts(load_checkpoint_facts(model))
    assert result.resolved is not None
    assert cost(result.resolved).params <= round(0.8 * original_params(facts))
    apply_and_restore(plan, model, tmp_path)


def test_moe_budget_candidates_are_the_widest_at_the_target(tmp_path: Path) -> None:
    """Every split is within the budget and one width step (8) wider would not be; the ends
    are width only (no drops) and drops only (no width)."""
    import dataclasses

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.analyze import model_facts
    from plangen.candidate import Candidate, original_params
    from plangen.strategies.moe_budget import drops_for, moe_budget

    facts = model_facts(load_checkpoint_facts(_model(tmp_path, "qwen2_moe")))
    one_each = Candidate("experts", "", experts_dropped={0: (0,), 1: (0,)})
    keep = one_each.params(facts) + 10  # a budget one drop per layer just reaches
    assert keep < original_params(facts)
    tables = {f"routing_weight.{k}.experts": np.array([4.0, 1.0, 3.0, 2.0]) for k in (0, 1)}
    cands = moe_budget(facts, tables, keep, "routing_weight", "wanda")
    assert drops_for(facts, keep) == 1
    drops = sorted({len(c.experts_dropped.get(0, ())) for c in cands})
    assert drops == [0, 1]
    for c in cands:
        assert c.params(facts) <= keep
        if c.expert_width is not None:
            wider = dataclasses.replace(c, expert_width=c.expert_width + 8)  # one step
            assert wider.params(facts) > keep, c.label
            assert c.unit_metric == "wanda"
    only_drops = [c for c in cands if c.expert_width is None]
    assert [c.experts_dropped for c in only_drops] == [{0: (1,), 1: (1,)}]
    assert only_drops[0].experts_rescale


def test_drops_and_width_together_equal_the_applied_model(tmp_path: Path) -> None:
    """A candidate that drops experts (rescaled) and narrows the survivors is measured as
    the model `plancc apply` writes from its plan."""
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from executor.apply import apply_plan
    from executor.loader import load
    from plangen.analyze import model_facts
    from plangen.candidate import Candidate
    from plangen.scores import read_sidecar
    from plangen.surgery import applied

    model = _model(tmp_path, "qwen2_moe")
    first = tmp_path / "first.prn"
    assert plangen(["analyze", str(model), "-o", str(first), *SMALL, "--drop-experts", "0.25"]) == 0
    header = first.read_text().split("\nmoe layers", 1)[0]
    plan = tmp_path / "plan.prn"
    plan.write_text(
        header + "\nmoe layers 0 drop experts 1 rescale\nmoe layers 1 drop experts 0, 2 rescale"
        "\nmoe layers 0..1 experts width 20 by wanda\n"
    )
    assert check_file(plan).ok
    ck = load_checkpoint_facts(model)
    facts = model_facts(ck)
    scores = read_sidecar(tmp_path / "first.scores.safetensors")
    cand = Candidate(
        "moe_budget",
        "",
        metric="routing_weight",
        experts_dropped={0: (1,), 1: (0, 2)},
        experts_rescale=True,
        expert_width=20,
        moe_layers=(0, 1),
        width_metric="wanda",
    )
    out = tmp_path / "o"
    apply_plan(plan, out)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = load(model, "cpu", torch.float32)
    before = ref(input_ids=ids).logits.detach()
    with torch.no_grad(), applied(ref, ck.arch, facts, cand, scores):
        want = ref(input_ids=ids).logits
    got = load(out / "A", "cpu", torch.float32)(input_ids=ids).logits.detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)
    torch.testing.assert_close(ref(input_ids=ids).logits.detach(), before)  # restored


@pytest.mark.model
@pytest.mark.slow
def test_fixture_default_drop_plan_rescales_applies_and_evaluates(
    qwen2moe_dir: Path, tmp_path: Path, capsys
) -> None:
    """On the trained fixture, dropping half the experts: the default plan rescales the
    kept experts, applies, and its model evaluates to a finite perplexity. How that
    perplexity compares with the single scores is measured by `benchmarks/moe_peers.py`
    (results: `benchmarks/results/moe-peers.md`), not pinned here."""
    from executor.cli import main as plancc

    plan = tmp_path / "p.prn"
    argv = ["analyze", str(qwen2moe_dir), "-o", str(plan), "--drop-experts", "0.5", "--quiet"]
    assert plangen(argv) == 0
    assert " rescale" in plan.read_text()
    assert check_file(plan).ok
    out = tmp_path / "out"
    assert plancc(["apply", str(plan), "-o", str(out)]) == 0
    capsys.readouterr()
    assert plancc(["eval", str(out / "A"), "--limit", "24", "--json"]) == 0
    import json

    ppl = json.loads(capsys.readouterr().out)["results"][0]["perplexity"]
    assert np.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_shrink_experts_plan_checks_applies_and_restores(arch: str, tmp_path: Path) -> None:
    """`--shrink-experts`: every expert keeps its own best channels by routed Wanda
    scores; the measured candidate is the model apply writes."""
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from executor.apply import apply_plan
    from executor.loader import load
    from plangen.analyze import model_facts
    from plangen.scores import read_sidecar
    from plangen.strategies.experts import shrink_experts
    from plangen.surgery import applied
    from tests.helpers.outputs import apply_and_restore

    model = _model(tmp_path, arch)
    plan = tmp_path / "plan.prn"
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--shrink-experts", "0.5"]) == 0
    text = plan.read_text()
    width = 16 if arch == "qwen2_moe" else 48
    assert f"experts width {width} by wanda" in text
    assert check_file(plan).ok
    scores = read_sidecar(tmp_path / "plan.scores.safetensors")
    assert scores.tables["wanda.0.experts_ffn"].shape == (4, width * 2)
    ck = load_checkpoint_facts(model)
    facts = model_facts(ck)
    out = tmp_path / "o"
    apply_plan(plan, out)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = load(model, "cpu", torch.float32)
    cand = shrink_experts(facts, "wanda", 0.5, shared=False)
    with torch.no_grad(), applied(ref, ck.arch, facts, cand, scores):
        want = ref(input_ids=ids).logits
    got = load(out / "A", "cpu", torch.float32)(input_ids=ids).logits.detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    apply_and_restore(plan, model, tmp_path)


def test_allocation_follows_the_measured_curves_and_keeps_groups_equal() -> None:
    """Layer 1's probed loss rises slowly, layer 0's fast: layer 1 takes more of the
    drops; with two routing groups every layer drops a multiple of two, one per group."""
    from compiler.facts import ModelFacts
    from plangen.strategies.experts import allocate_experts, probe_counts

    facts = ModelFacts("m", None, layers=2, experts=8, top_k=2, expert_groups=2)
    tables = {f"routing_weight.{k}.experts": np.arange(8, dtype=float) for k in (0, 1)}
    counts = probe_counts(facts, 2)
    assert counts == [0, 2, 4]
    curves = {0: np.array([0.0, 1.0, 3.0]), 1: np.array([0.0, 0.1, 0.3])}
    cand = allocate_experts(facts, tables, "routing_weight", 2, counts, curves, rescale=True)
    assert cand.experts_dropped == {0: (), 1: (0, 1, 4, 5)}  # the lowest two of each group
    assert cand.experts_rescale and "allocated over layers by measured loss" in cand.label


def test_drop_and_shrink_experts_together(tmp_path: Path) -> None:
    """`--drop-experts` with `--shrink-experts`: every candidate drops and narrows."""
    model = _model(tmp_path, "mixtral")
    plan = tmp_path / "plan.prn"
    both = ["--drop-experts", "0.25", "--shrink-experts", "0.5"]
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, *both]) == 0
    text = plan.read_text()
    listed = [line for line in text.splitlines() if line.startswith("#   ")]
    assert listed and all("+ shrink: 50% of the channels of experts" in line for line in listed)
    assert "drop experts" in text and "experts width 48 by wanda" in text
    assert check_file(plan).ok


def test_moe_budget_weighs_kv_groups_and_dense_mlps(tmp_path: Path) -> None:
    """The dense axes of a MoE budget: candidates that drop the lowest KV group of every
    layer by `wanda.L.attn` (the attention tables of the router pass), and a dense MLP
    layer (Qwen's `mlp_only_layers`) narrowed by the experts' fraction, all within the
    budget; without attention tables (a `--drop-experts` sidecar) no groups are tried."""
    from compiler.checkpoint import load_checkpoint_facts
    from plangen.analyze import model_facts
    from plangen.candidate import original_params
    from plangen.strategies.moe_budget import group_counts, groups_dropped, moe_budget
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    model = add_char_tokenizer(
        make_tiny_model(tmp_path, "qwen2_moe", mlp_only_layers=[0], **FOUR_GROUPS)
    )
    facts = model_facts(load_checkpoint_facts(model))
    assert [facts.is_moe_layer(i) for i in (0, 1)] == [False, True]
    assert group_counts(facts) == [0, 1]  # a quarter of 4 KV groups
    two = model_facts(load_checkpoint_facts(make_tiny_model(tmp_path, "qwen2_moe", name="two")))
    assert group_counts(two) == [0]  # 1 of 2 would be half the attention
    keep = round(0.8 * original_params(facts))
    tables = {
        "routing_weight.1.experts": np.array([4.0, 1.0, 3.0, 2.0]),
        "wanda.1.experts_ffn": np.tile(np.arange(32.0), (4, 1)),
        "wanda.0.attn": np.array([2.0, 1.0, 3.0, 4.0]),
        "wanda.1.attn": np.array([1.0, 2.0, 3.0, 4.0]),
        "wanda.0.mlp": np.arange(96.0),
    }
    assert groups_dropped(facts, tables, 1, "wanda") == {0: (1,), 1: (0,)}
    cands = moe_budget(facts, tables, keep, "routing_weight", "wanda", groups=[0, 1])
    with_groups = [c for c in cands if c.groups_dropped]
    assert with_groups and len(with_groups) < len(cands)
    for c in cands:
        assert c.params(facts) <= keep, c.label
        if c.expert_width is not None:  # the dense layer narrowed by the same fraction
            assert c.mlp_width == {0: round(96 * c.expert_width / 32 / 8) * 8}, c.label
            assert "dense MLP width" in c.label
        if c.groups_dropped:
            assert c.groups_dropped == {0: (1,), 1: (0,)}
            assert c.unit_metric == "wanda" and "1 of 4 KV groups dropped" in c.label

    # Attention alone costs a share of the budget, so those candidates drop fewer experts.
    def most(cs: list) -> int:
        return max(len(c.experts_dropped.get(1, ())) for c in cs)

    assert most(with_groups) <= most([c for c in cands if not c.groups_dropped])


def test_target_params_plan_with_kv_groups_equals_its_measurement(tmp_path: Path) -> None:
    """`--target-params` on a MoE model measures its KV-group candidates as `plancc
    apply` writes them: the plan's `attn ... drop groups` statements (scored by wanda in
    the router pass) applied give the logits of `heldout.applied` on the candidate."""
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from executor.apply import apply_plan
    from executor.loader import load
    from plangen.analyze import model_facts
    from plangen.candidate import Candidate
    from plangen.scores import read_sidecar
    from plangen.surgery import applied
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    model = add_char_tokenizer(make_tiny_model(tmp_path, "qwen2_moe", **FOUR_GROUPS))
    budget = tmp_path / "budget.prn"
    assert (
        plangen(["analyze", str(model), "-o", str(budget), *SMALL, "--target-params", "0.8"]) == 0
    )
    text = budget.read_text()
    assert "KV groups dropped per layer by wanda" in text  # among the candidates listed
    scores = read_sidecar(tmp_path / "budget.scores.safetensors")
    assert scores.has("wanda.0.attn") and scores.has("wanda.1.attn")
    header = text.split("\nmoe layers", 1)[0].split("\nattn layers", 1)[0]
    low = {i: int(np.argmin(scores.tables[f"wanda.{i}.attn"])) for i in (0, 1)}
    plan = tmp_path / "plan.prn"
    plan.write_text(
        header + f"\nattn layers 0 drop groups {low[0]}\nattn layers 1 drop groups {low[1]}"
        "\nmoe layers 0..1 drop experts 3 rescale\n"
    )
    result = check_file(plan)
    assert result.ok, result.errors
    ck = load_checkpoint_facts(model)
    facts = model_facts(ck)
    cand = Candidate(
        "moe_budget",
        "",
        metric="routing_weight",
        groups_dropped={0: (low[0],), 1: (low[1],)},
        experts_dropped={0: (3,), 1: (3,)},
        experts_rescale=True,
        width_metric="wanda",
    )
    out = tmp_path / "o"
    apply_plan(plan, out)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = load(model, "cpu", torch.float32)
    with torch.no_grad(), applied(ref, ck.arch, facts, cand, scores):
        want = ref(input_ids=ids).logits
    got = load(out / "A", "cpu", torch.float32)(input_ids=ids).logits.detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
