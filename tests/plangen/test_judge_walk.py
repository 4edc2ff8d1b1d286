"""One walk for every candidate (issue 36): `plangen.heldout.walk_losses` measures many
variants of a model in one layer walk, each decoder layer loaded once, and gives
each variant exactly `mean_loss` of the loaded model under `surgery.applied`: the
same float, not within a tolerance, resident (`LayerWalk.over`) or with one layer
in memory at a time (`LayerWalk.open(resident=False)`). The judge, the layer
removal losses and the MoE probe curves run on it and give the figures of their
in-memory loops (kept here as the references)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from executor.layerwise import LayerWalk
from plangen.analyze import model_facts
from plangen.candidate import Candidate
from plangen.heldout import Judged, Variant, judge, mean_loss, walk_losses
from plangen.scores import ScoreTables, geometry
from plangen.surgery import Solved, applied, applied_layer, moe_modules
from tests.helpers.layerwise import build, materialized, token_windows

FAMILIES = ("llama", "qwen2", "gemma3_text", "qwen2_moe")
BATCH = 2  # five windows: batches of 2, 2 and 1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge-walk")
    return {f: build(root, f) for f in FAMILIES}


class Setup:
    """A tiny checkpoint loaded whole, its facts, random score tables and candidates
    that exercise every kind of change `applied_layer` makes."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.dir = model_dir
        ck = load_checkpoint_facts(model_dir)
        self.arch, self.facts = ck.arch, model_facts(ck)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.scores = _scores(self.model, self.arch, self.facts)
        self.cands, self.solved = _candidates(self.facts, self.scores)

    def solutions(self, cand: Candidate) -> list[Solved]:
        return self.solved if cand.reconstruct else []

    def variant(self, cand: Candidate) -> Variant:
        solved = self.solutions(cand)
        return lambda i, layer: applied_layer(
            layer, i, self.arch, self.facts, cand, self.scores, solved
        )

    def in_memory(self, cand: Candidate, windows: Sequence[Sequence[int]]) -> float:
        """The reference: the whole model under `applied`, then `mean_loss`."""
        with applied(self.model, self.arch, self.facts, cand, self.scores, self.solutions(cand)):
            return mean_loss(self.model, windows, BATCH)


def _scores(model: Any, arch: Any, facts: Any) -> ScoreTables:
    rng = np.random.default_rng(0)
    geom = geometry(facts)
    tables: dict[str, np.ndarray] = {}
    layers = model.get_submodule(arch.layers_module)
    for i in range(facts.layers):
        tables[f"mean_in.{i}.attn"] = rng.standard_normal(geom.size("q"))
        mods = moe_modules(layers[i], facts.experts or 0)
        if mods is None:
            tables[f"magnitude.{i}.mlp"] = rng.random(geom.size("ffn"))
            tables[f"mean_in.{i}.mlp"] = rng.standard_normal(geom.size("ffn"))
            continue
        experts, _, width = mods.experts.down_proj.shape
        tables[f"router_prob.{i}.experts"] = rng.dirichlet(np.ones(experts))
        tables[f"wanda.{i}.experts_ffn"] = rng.random((experts, width))
        tables[f"wanda.{i}.shared"] = rng.random(mods.shared.weight.shape[-1])
    return ScoreTables(tables, {})


def _candidates(facts: Any, scores: ScoreTables) -> tuple[list[Candidate], list[Solved]]:
    """Dense: KV groups, narrowed MLPs with `compensate`, a dropped layer, reconstructed
    projections (one by the candidate's columns, one by the walk's own). MoE: expert
    drops (rescaled and not), expert and shared-expert widths, both together."""
    g = torch.Generator().manual_seed(7)
    geom = geometry(facts)
    groups = Candidate("uniform", "g", groups_dropped={1: (0,)}, compensate=True)
    if facts.experts:
        return [
            groups,
            Candidate("moe", "d", experts_dropped={0: (1,), 1: (0, 2)}, experts_rescale=True),
            Candidate("moe", "e", experts_dropped={1: (3,)}),
            Candidate(
                "moe",
                "w",
                expert_width=12,
                shared_width=20,
                moe_layers=(0, 1),
                width_metric="wanda",
            ),
            Candidate(
                "moe",
                "dw",
                experts_dropped={0: (2,)},
                experts_rescale=True,
                expert_width=20,
                moe_layers=(0, 1),
                width_metric="wanda",
            ),
        ], []
    narrow = Candidate("uniform", "m", mlp_width={0: 40, 1: 64}, compensate=True)
    rebuilt = Candidate("uniform", "r", mlp_width={0: 48}, reconstruct=True)
    kept = rebuilt.kept_inputs(0, "ffn", facts, scores)
    assert kept is not None
    own = np.arange(0, geom.size("q"), 2)  # `by obs`: the walk's own choice
    solved = [
        Solved(0, "mlp", kept, torch.randn(facts.hidden, len(kept), generator=g)),
        Solved(1, "attn", own, torch.randn(facts.hidden, len(own), generator=g)),
    ]
    return [groups, narrow, Candidate("depth", "x", drop=(1,)), rebuilt], solved


@pytest.fixture(scope="module")
def setups(models: dict[str, Path]) -> dict[str, Setup]:
    return {f: Setup(d) for f, d in models.items()}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_resident_walk_equals_mean_loss_under_applied(setups: dict[str, Setup], family: str):
    s = setups[family]
    windows = token_windows()
    before = _state(s.model)
    want = [s.in_memory(c, windows) for c in s.cands] + [mean_loss(s.model, windows, BATCH)]
    walk = LayerWalk.over(s.model, s.arch, "cpu", BATCH)
    got = walk_losses(walk, windows, [*map(s.variant, s.cands), None])
    assert got == want
    assert len(set(got)) == len(got)  # every candidate changes the loss: not vacuous
    after = s.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # restored
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in s.model.modules())


def _one_layer_at_a_time(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every layer load recorded, and refused while another layer is materialized."""
    loads: list[int] = []
    load = LayerWalk._load_layer

    def one(walk: LayerWalk, i: int) -> torch.nn.Module:
        assert materialized(walk) == []
        loads.append(i)
        return load(walk, i)

    monkeypatch.setattr(LayerWalk, "_load_layer", one)
    return loads


@pytest.mark.parametrize("family", FAMILIES)
def test_non_resident_walk_gives_the_same_floats_loading_each_layer_once(
    setups: dict[str, Setup], family: str, monkeypatch: pytest.MonkeyPatch
):
    s = setups[family]
    windows = token_windows()
    want = [s.in_memory(c, windows) for c in s.cands] + [mean_loss(s.model, windows, BATCH)]
    loads = _one_layer_at_a_time(monkeypatch)
    with LayerWalk.open(s.dir, resident=False, batch_size=BATCH) as walk:
        got = walk_losses(walk, windows, [*map(s.variant, s.cands), None])
        assert materialized(walk) == []
    assert got == want
    assert loads == list(range(s.facts.layers))


def test_variants_share_the_original_states_until_they_change_a_layer(
    setups: dict[str, Setup], monkeypatch: pytest.MonkeyPatch
):
    """A variant that leaves layers as they are (its context None) runs on the
    original's states: layer 0 runs twice (the original, the variant changing it), layer
    1 three times; and a variant that changes nothing is the original to the bit."""
    s = setups["llama"]
    windows = token_windows()
    runs: list[int] = []
    forward = LayerWalk.forward_layer

    def counted(walk: LayerWalk, i: int, *a: Any, **kw: Any) -> Any:
        runs.append(i)
        return forward(walk, i, *a, **kw)

    monkeypatch.setattr(LayerWalk, "forward_layer", counted)
    bypass = [Candidate("depth", "", drop=(d,)) for d in (0, 1)]

    def only(d: int) -> Variant:
        return lambda i, layer: s.variant(bypass[d])(i, layer) if i == d else None

    walk = LayerWalk.over(s.model, s.arch, "cpu", BATCH)
    got = walk_losses(walk, windows, [only(0), only(1), lambda i, layer: None, None])
    assert sorted(runs) == [0, 0, 1, 1, 1]
    assert got[:2] == [s.in_memory(c, windows) for c in bypass]
    assert got[2] == got[3] == mean_loss(s.model, windows, BATCH)


def _reference_judge(
    s: Setup, cands: Sequence[Candidate], held: Sequence[Sequence[int]]
) -> tuple[list[Judged], float]:
    """The judge before the walk (main at 6d38f1f): each candidate a full forward under
    `applied`, round by round, and the original's `mean_loss` over every window."""

    def loss_on(cand: Candidate, windows: Sequence[Sequence[int]]) -> float:
        return s.in_memory(cand, windows)

    before = mean_loss(s.model, held, BATCH)
    if len(cands) <= 2 or len(held) < 2:
        return [Judged(c, x, x, len(held)) for c in cands for x in [loss_on(c, held)]], before
    first = max(1, len(held) // 4)
    round1 = [Judged(c, loss_on(c, held[:first]), None, first) for c in cands]
    keep = max(2, math.ceil(len(cands) / 2))
    order = sorted(range(len(cands)), key=lambda i: round1[i].first)
    out = list(round1)
    for i in order[:keep]:
        rest = loss_on(cands[i], held[first:])
        mean = (round1[i].first * first + rest * (len(held) - first)) / len(held)
        out[i] = Judged(cands[i], round1[i].first, mean, len(held))
    return out, before


def _recording(s: Setup) -> tuple[list[str], Callable[[Candidate], list[Solved]]]:
    asked: list[str] = []

    def solutions(cand: Candidate) -> list[Solved]:
        asked.append(cand.label)
        return s.solutions(cand)

    return asked, solutions


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("count", [2, 4])
def test_judge_on_a_walk_equals_the_in_memory_judge(
    setups: dict[str, Setup], family: str, count: int
):
    """Both rounds' figures, who goes on to round two, and the original's held-out loss:
    `mean_loss` over every window to the bit, though the rounds' batches (first window
    alone, then 2 + 2 + 1) are not `mean_loss`'s (2 + 2 + 2)."""
    s = setups[family]
    held = token_windows(n=6)
    cands = s.cands[:count]
    asked, solutions = _recording(s)
    walk = LayerWalk.over(s.model, s.arch, "cpu", BATCH)
    got = judge(walk, s.facts, s.scores, cands, held, solutions)
    assert got == _reference_judge(s, cands, held)
    assert got[1] == mean_loss(s.model, held, BATCH)
    finalists = [j.candidate.label for j in got[0] if j.loss is not None]
    assert len(finalists) == 2
    # `solutions` is asked for the reconstructed candidates of each round.
    rebuilt = [c.label for c in cands if c.reconstruct]
    again = [x for x in rebuilt if x in finalists] if count > 2 else []
    assert sorted(asked) == sorted(rebuilt + again)


def test_judge_on_a_non_resident_walk(setups: dict[str, Setup], monkeypatch: pytest.MonkeyPatch):
    """The same verdict with one layer in memory: each round loads each layer once."""
    s = setups["llama"]
    held = token_windows(n=6)
    want = _reference_judge(s, s.cands, held)
    loads = _one_layer_at_a_time(monkeypatch)
    with LayerWalk.open(s.dir, resident=False, batch_size=BATCH) as walk:
        got = judge(walk, s.facts, s.scores, s.cands, held, s.solutions)
    assert got == want
    assert loads == [0, 1, 0, 1]


def test_removal_losses_are_the_bypassed_models_mean_losses(setups: dict[str, Setup]):
    from plangen.analyze_dense import removal_losses

    s = setups["qwen2"]
    held = token_windows()
    opts = SimpleNamespace(device="cpu", batch_size=BATCH, progress=False)
    walk = LayerWalk.over(s.model, s.arch, batch_size=BATCH)
    got = removal_losses(walk, s.arch, s.facts, s.scores, held, opts)  # type: ignore[arg-type]
    want = [s.in_memory(Candidate("depth", "", drop=(i,)), held) for i in range(s.facts.layers)]
    assert got == want


def test_removal_curves_are_the_probed_models_mean_losses(setups: dict[str, Setup]):
    from plangen.metrics.router import removal_curves
    from plangen.surgery import experts_removed

    s = setups["qwen2_moe"]
    windows = token_windows()
    layers = s.model.get_submodule(s.arch.layers_module)
    order = {0: [3, 1, 0, 2], 1: [2, 0, 3, 1]}
    prob = {k: s.scores.tables[f"router_prob.{k}.experts"] for k in (0, 1)}
    counts = [0, 1, 2]
    walk = LayerWalk.over(s.model, s.arch, batch_size=BATCH)
    got = removal_curves(walk, [0, 1], 4, order, counts, windows, prob, progress=False)
    base = mean_loss(s.model, windows, BATCH)
    for k in (0, 1):
        want = [0.0]
        for c in counts[1:]:
            with experts_removed(layers, {k: order[k][:c]}, 4, prob):
                want.append(mean_loss(s.model, windows, BATCH) - base)
        assert got[k].tolist() == want
        assert got[k].dtype == np.float64 and all(want[1:])
