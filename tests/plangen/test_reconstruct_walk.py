"""Reconstruction of several candidates in one walk (`plangen.reconstruct.solve_all`)
equals each candidate's own walk, bit for bit, on the loaded model and on a walk
opened on the checkpoint with one decoder layer in memory at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from executor.layerwise import LayerWalk
from plangen.analyze import model_facts
from plangen.candidate import Candidate
from plangen.metrics import OBS
from plangen.reconstruct import Settings, sequential, solve_all
from plangen.scores import ScoreTables
from tests.helpers.models import make_tiny_model

L = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("rw"), "qwen2", num_hidden_layers=L, initializer_range=0.2
    )


def _windows() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 128, (6, 10), generator=g).tolist()


def _scores(facts) -> ScoreTables:
    rng = np.random.default_rng(0)
    tables = {}
    for i in range(facts.layers):
        tables[f"s.{i}.mlp"] = rng.random(facts.ffn)
        tables[f"s.{i}.attn"] = rng.random(facts.kv_heads)
        tables[f"mean_in.{i}.mlp"] = rng.random(facts.ffn)
        tables[f"mean_in.{i}.attn"] = rng.random(facts.heads * facts.head_dim)
    return ScoreTables(tables, {})


CANDIDATES = [
    Candidate(
        "u",
        "both",
        groups_dropped={0: (1,)},
        mlp_width={0: 40, 2: 50},
        metric="s",
        reconstruct=True,
    ),
    Candidate("u", "obs", mlp_width={0: 64, 1: 48, 2: 30}, metric=OBS, reconstruct=True),
    # A dropped layer, and a compensated cut that is not re-solved (targets below).
    Candidate(
        "u",
        "drop",
        drop=(1,),
        groups_dropped={2: (0,)},
        mlp_width={0: 32, 2: 70},
        metric="s",
        reconstruct=True,
        compensate=True,
    ),
]
TARGETS = [None, None, {(0, "mlp"), (2, "attn")}]


def _same(got, want) -> None:
    assert [(s.layer, s.part) for s in got] == [(s.layer, s.part) for s in want]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.kept, b.kept)
        assert torch.equal(a.weight, b.weight), (a.layer, a.part)
        assert (a.ranking is None) == (b.ranking is None)
        if a.ranking is not None:
            assert np.array_equal(a.ranking, b.ranking)


def _counting(walk: LayerWalk) -> list[int]:
    """The layer of every `forward_batch` call the walk makes from now on (one per batch)."""
    runs: list[int] = []
    real = walk.forward_batch

    def counted(i, states, k, module=None):
        runs.append(i)
        return real(i, states, k, module)

    walk.forward_batch = counted  # type: ignore[method-assign]
    return runs


@pytest.mark.parametrize("mode", ["sequential", "one-shot", "residual"])
def test_one_walk_for_every_candidate_equals_one_walk_each(model_dir: Path, mode: str) -> None:
    from transformers import AutoModelForCausalLM

    ck = load_checkpoint_facts(model_dir)
    facts, scores, windows = model_facts(ck), _scores(model_facts(ck)), _windows()
    settings = Settings(one_shot=mode == "one-shot", residual=mode == "residual")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    each = [
        sequential(
            model,
            ck.arch,
            facts,
            c,
            scores,
            windows,
            targets=t,
            batch_size=4,
            damp=settings.damp,
            one_shot=settings.one_shot,
            residual=settings.residual,
            progress=False,
        )
        for c, t in zip(CANDIDATES, TARGETS, strict=True)
    ]
    for n, p in model.named_parameters():  # the model is left as it was
        assert torch.equal(p, before[n]), n
    assert all(each)
    jobs = list(zip(CANDIDATES, TARGETS, strict=True))
    resident = solve_all(
        LayerWalk.over(model, ck.arch, batch_size=4),
        ck.arch,
        facts,
        jobs,
        scores,
        windows,
        settings,
        progress=False,
    )
    for got, want in zip(resident, each, strict=True):
        _same(got, want)
    loaded: list[int] = []
    with LayerWalk.open(model_dir, batch_size=4) as walk:
        real = walk._load_layer

        def load(i: int):
            loaded.append(i)
            return real(i)

        walk._load_layer = load  # type: ignore[method-assign]
        offloaded = solve_all(walk, ck.arch, facts, jobs, scores, windows, settings, progress=False)
        assert not any(p.device.type != "meta" for p in walk.layers.parameters())
    assert loaded == list(range(L))  # each layer read once for all three candidates
    for got, want in zip(offloaded, each, strict=True):
        _same(got, want)


def test_one_shot_candidates_share_one_forward_and_one_obs_ranking(model_dir: Path) -> None:
    """One-shot: candidates whose layers read the same inputs share the forward, the
    Grams and the OBS ranking (decided down to the narrowest width); each one's kept
    sets and solved weights are what it gets alone."""
    from transformers import AutoModelForCausalLM

    ck = load_checkpoint_facts(model_dir)
    facts, scores, windows = model_facts(ck), _scores(model_facts(ck)), _windows()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cands = [
        Candidate("u", "wide", mlp_width={0: 64, 1: 48, 2: 30}, metric=OBS, reconstruct=True),
        Candidate("u", "narrow", mlp_width={0: 20, 1: 70, 2: 12}, metric=OBS, reconstruct=True),
        Candidate(
            "u", "s", groups_dropped={1: (0,)}, mlp_width={0: 40}, metric="s", reconstruct=True
        ),
    ]
    settings = Settings(one_shot=True)
    alone = [
        solve_all(
            LayerWalk.over(model, ck.arch, batch_size=4),
            ck.arch, facts, [(c, None)], scores, windows, settings, progress=False,
        )[0]
        for c in cands
    ]  # fmt: skip
    walk = LayerWalk.over(model, ck.arch, batch_size=4)
    runs = _counting(walk)
    together = solve_all(
        walk, ck.arch, facts, [(c, None) for c in cands], scores, windows, settings, progress=False
    )
    batches = -(-len(windows) // 4)
    assert runs == [i for i in range(L) for _ in range(batches)]  # one forward for all three
    for got, want in zip(together, alone, strict=True):
        assert [(s.layer, s.part) for s in got] == [(s.layer, s.part) for s in want]
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a.kept, b.kept)
            assert torch.equal(a.weight, b.weight), (a.layer, a.part)
    # The wide candidate's ranking is the one decided to the narrow widths: the same
    # object for both, the same kept sets as its own.
    for a, b in zip(together[0], together[1], strict=True):
        assert a.ranking is b.ranking


def test_one_shot_on_the_calibrations_grams_equals_its_own_walk(model_dir: Path) -> None:
    """The Grams the calibration's forward walk gathers (`SharedGrams`) are the ones a
    one-shot walk gathers, bit for bit: the solves need no forward of their own."""
    from transformers import AutoModelForCausalLM

    from plangen.calibrate import collect
    from plangen.reconstruct import SharedGrams, one_shot_walks

    ck = load_checkpoint_facts(model_dir)
    facts, scores, windows = model_facts(ck), _scores(model_facts(ck)), _windows()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    jobs = [(c, None) for c in CANDIDATES[:2]]
    settings = Settings(one_shot=True)
    walked = solve_all(
        LayerWalk.over(model, ck.arch, batch_size=4),
        ck.arch, facts, jobs, scores, windows, settings, progress=False,
    )  # fmt: skip
    grams = SharedGrams(ck.arch)
    collect(model, ck.arch, windows, observers=[grams], batch_size=4, progress=False)
    assert len(grams.grams) == 2 * L
    assert one_shot_walks(jobs, facts, None) == 1 and one_shot_walks(jobs, facts, grams) == 0
    walk = LayerWalk.over(model, ck.arch, batch_size=4)
    walk.forward_batch = None  # type: ignore[assignment,method-assign]  # never called
    given = solve_all(
        walk, ck.arch, facts, jobs, scores, windows, settings, progress=False, grams=grams
    )
    for got, want in zip(given, walked, strict=True):
        _same(got, want)
    # A stream that is not the unpruned model's (a dropped layer) still walks.
    dropped = [(CANDIDATES[2], TARGETS[2])]
    assert one_shot_walks(dropped, facts, grams) == 1


def test_in_step_is_one_forward_per_layer_and_the_same_bits(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential, every batch's forward in step through each layer (waiting at o_proj
    and down_proj while each is solved) gives the pass-by-pass walk's kept sets, solved
    weights and OBS rankings bit for bit, with one forward of each batch per layer and
    candidate (a dropped layer none) instead of a pass to each projection and one more."""
    from transformers import AutoModelForCausalLM

    import plangen.reconstruct as reconstruct

    ck = load_checkpoint_facts(model_dir)
    facts, scores, windows = model_facts(ck), _scores(model_facts(ck)), _windows()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    jobs = list(zip(CANDIDATES, TARGETS, strict=True))
    batches = -(-len(windows) // 4)

    def walked(in_step: bool) -> tuple[list[list], list[int]]:
        monkeypatch.setattr(reconstruct, "in_step_walk", lambda *_: in_step)
        walk = LayerWalk.over(model, ck.arch, batch_size=4)
        runs = _counting(walk)
        return solve_all(walk, ck.arch, facts, jobs, scores, windows, progress=False), runs

    by_passes, passes = walked(False)
    in_step, runs = walked(True)
    for got, want in zip(in_step, by_passes, strict=True):
        _same(got, want)
    walked_layers = [i for i in range(L) for c, _ in jobs if i not in c.drop]
    assert runs == [i for i in walked_layers for _ in range(batches)]
    assert len(passes) > len(runs)  # passes to the projections besides


def test_in_step_is_not_chosen_for_states_on_disk_or_residual(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """States on disk (memory is short) or the residual mode (its statistics need the
    layer's output): the walk goes pass by pass."""
    import plangen.reconstruct as reconstruct

    ck = load_checkpoint_facts(model_dir)
    facts, windows = model_facts(ck), _windows()
    with LayerWalk.open(model_dir, batch_size=4) as walk:
        assert reconstruct.in_step_walk(walk, facts, windows)
    with LayerWalk.open(model_dir, batch_size=4, cache=tmp_path) as walk:
        assert not reconstruct.in_step_walk(walk, facts, windows)
    seen: list[bool] = []
    real = reconstruct._Step.run

    def spy(self, *a):
        seen.append(self.crew is not None)
        return real(self, *a)

    monkeypatch.setattr(reconstruct._Step, "run", spy)
    with LayerWalk.open(model_dir, batch_size=4) as walk:
        solve_all(
            walk, ck.arch, facts, [(CANDIDATES[0], None)], _scores(facts), windows,
            Settings(residual=True), progress=False,
        )  # fmt: skip
    assert seen and not any(seen)
