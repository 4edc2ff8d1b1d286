"""Calibration on the layer walk (issue 36): `plangen.calibrate.collect` over a walk
opened on the checkpoint, one decoder layer in memory at a time, measures exactly
what it measures over the loaded model (the walk with every layer resident):
depth statistics, projection-input moments, the calibration loss, the Fisher term
per unit, compared with `torch.equal`, and every width metric's scores, scored in
the walk while their layer alone is loaded, and the sidecar tables made of them,
compared with `np.array_equal`; a layer's summed gradients are freed before the
next layer's exist. The MoE router statistics (`collect_router`) and the unit
tables of a parameter budget (`scores.UnitTables`) the same way."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from compiler.facts import ModelFacts
from executor.layerwise import LayerWalk
from plangen.calibrate import Calibration, collect
from plangen.metrics import WIDTH_METRIC_NAMES
from plangen.metrics.inputs import LayerInputs
from plangen.metrics.registry import WIDTH_METRICS
from tests.helpers.models import make_tiny_model

FAMILIES = ("llama", "qwen2_moe", "gemma3_text")
# qwen2_moe: MoE layers 0 and 2 around a dense layer 1, so both kinds are scored.
CONFIGS = {"qwen2_moe": {"num_hidden_layers": 3, "mlp_only_layers": [1]}}
BATCH = 2  # five windows: batches of 2, 2 and 1
FORWARD_ONLY = [m for m in WIDTH_METRIC_NAMES if WIDTH_METRICS[m].needs != "gradients"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return {
        f: make_tiny_model(
            root, f, max_position_embeddings=128, initializer_range=0.2, **CONFIGS.get(f, {})
        )
        for f in FAMILIES
    }


def _windows(n: int = 5, seq: int = 24, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, vocab, (n, seq), generator=g).tolist()


def _materialized(walk: LayerWalk) -> list[int]:
    return [
        i
        for i, layer in enumerate(walk.layers)
        if any(p.device.type != "meta" for p in layer.parameters())
    ]


def _facts(model_dir: Path) -> ModelFacts:
    from plangen.analyze import model_facts

    return model_facts(load_checkpoint_facts(model_dir))


def _alone(walk: LayerWalk, i: int) -> None:
    assert _materialized(walk) == [i], "a layer is scored while it alone is loaded"


def _one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every decoder layer the walk loads, in order; loading one while another is still
    materialized fails."""
    loads: list[int] = []
    load = LayerWalk._load_layer

    def checked(walk: LayerWalk, i: int) -> torch.nn.Module:
        assert _materialized(walk) == []  # never two decoder layers in memory
        loads.append(i)
        return load(walk, i)

    monkeypatch.setattr(LayerWalk, "_load_layer", checked)
    return loads


def _spy_metrics(
    monkeypatch: pytest.MonkeyPatch, check: Callable[[str, LayerInputs], None]
) -> None:
    """Every width metric calls `check(name, layer)` before it scores."""

    def spy(metric: str, score: Callable) -> Callable:
        def scored(layer: LayerInputs):
            check(metric, layer)
            return score(layer)

        return scored

    for name, m in list(WIDTH_METRICS.items()):
        monkeypatch.setitem(WIDTH_METRICS, name, dataclasses.replace(m, score=spy(name, m.score)))


def _same(got: Calibration, want: Calibration) -> None:
    assert (got.batches, got.tokens, got.gradients) == (want.batches, want.tokens, want.gradients)
    assert got.loss == want.loss or (got.loss != got.loss and want.loss != want.loss)
    assert got.depth.block_influence() == want.depth.block_influence()
    assert got.depth.angular_distance() == want.depth.angular_distance()
    for g, w in zip(got.layers, want.layers, strict=True):
        for a, b in ((g.attn_in, w.attn_in), (g.mlp_in, w.mlp_in)):
            assert a.count == b.count
            if b.total is not None:
                assert torch.equal(a.total, b.total) and torch.equal(a.squares, b.squares)
        assert list(g.scores) == list(w.scores)
        for name, scores in w.scores.items():
            assert np.array_equal(g.scores[name].groups, scores.groups), name
            assert np.array_equal(g.scores[name].channels, scores.channels), name
        if w.fisher is not None:
            assert torch.equal(g.fisher.groups, w.fisher.groups)
            assert torch.equal(g.fisher.channels, w.fisher.channels)


@pytest.mark.parametrize("gradients", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_offloaded_equals_in_memory(
    models: dict[str, Path], family: str, gradients: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statistics, every layer's scores (MoE layers: attention) and the sidecar tables,
    forward-only metrics or all of them; each metric scores a layer while that layer
    alone is loaded, and the tables need no model."""
    from transformers import AutoModelForCausalLM

    from plangen.scores import compute_tables, geometry

    model_dir = models[family]
    arch, facts = load_checkpoint_facts(model_dir).arch, _facts(model_dir)
    metrics = list(WIDTH_METRIC_NAMES) if gradients else FORWARD_ONLY
    windows = _windows()
    kw = {
        "metrics": metrics, "seed": 5, "gradients": gradients, "fisher": gradients,
        "geom": geometry(facts), "progress": False,
    }  # fmt: skip
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = collect(full, arch, windows, batch_size=BATCH, **kw)
    assert all(sorted(s.scores) == sorted(metrics) for s in want.layers)
    if gradients:
        assert want.layers[0].fisher is not None
    del full

    loads = _one_at_a_time(monkeypatch)
    opened: list[LayerWalk] = []
    scored: list[tuple[int, str]] = []

    def alone(name: str, layer: LayerInputs) -> None:
        _alone(opened[0], layer.index)
        scored.append((layer.index, name))

    _spy_metrics(monkeypatch, alone)
    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        opened.append(walk)
        got = collect(None, arch, windows, walk=walk, **kw)
        assert _materialized(walk) == []
    n = len(got.layers)
    assert loads == list(range(n)) + (list(reversed(range(n))) if gradients else [])
    assert sorted(scored) == sorted((i, m) for i in range(n) for m in metrics)
    _same(got, want)
    tables = compute_tables(facts, got, metrics).tables
    expected = compute_tables(facts, want, metrics).tables
    assert list(tables) == list(expected)
    assert any(k.startswith(f"{metrics[-1]}.") for k in tables)  # a dense layer's
    for name, table in expected.items():
        assert np.array_equal(tables[name], table, equal_nan=True), name


def test_gradient_sums_are_freed_layer_by_layer(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep hands a layer's summed gradients to the gradient metrics while it is
    loaded; by the time the next layer's exist, nothing holds them (`weakref`), and
    the Calibration keeps none: never more than one layer's worth."""
    from plangen.scores import geometry

    model_dir = models["llama"]
    arch, facts = load_checkpoint_facts(model_dir).arch, _facts(model_dir)
    seen: list[tuple[int, list[weakref.ref[torch.Tensor]]]] = []

    def one_layer_held(name: str, layer: LayerInputs) -> None:
        if name != "taylor":
            return
        assert layer.grads, "the sweep hands the summed gradients over"
        assert all(r() is None for _, refs in seen for r in refs), "an earlier layer's"
        seen.append((layer.index, [weakref.ref(g) for g in layer.grads.values()]))

    _spy_metrics(monkeypatch, one_layer_held)
    _one_at_a_time(monkeypatch)
    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        calib = collect(
            None, arch, _windows(), metrics=["taylor", "taylor2"], gradients=True, fisher=True,
            geom=geometry(facts), walk=walk, progress=False,
        )  # fmt: skip
    assert [i for i, _ in seen] == list(reversed(range(facts.layers or 0)))
    assert all(r() is None for _, refs in seen for r in refs)
    assert all(list(s.scores) == ["taylor", "taylor2"] for s in calib.layers)


def test_gradient_metrics_need_the_sweep(models: dict[str, Path]) -> None:
    from plangen.scores import geometry

    model_dir = models["llama"]
    arch, geom = load_checkpoint_facts(model_dir).arch, geometry(_facts(model_dir))
    with pytest.raises(ValueError, match="taylor need the gradient pass"):
        collect(None, arch, _windows(), metrics=["wanda", "taylor"], geom=geom)
    with pytest.raises(ValueError, match="need the layer geometry"):
        collect(None, arch, _windows(), metrics=["wanda"])


def test_an_error_mid_walk_leaves_no_cache(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """States on disk: an exception in layer 1 (or Ctrl-C) leaves the directory empty."""
    model_dir = models["llama"]
    arch = load_checkpoint_facts(model_dir).arch
    load = LayerWalk._load_layer

    def fail(walk: LayerWalk, i: int) -> torch.nn.Module:
        if i == 1:
            raise KeyboardInterrupt
        return load(walk, i)

    monkeypatch.setattr(LayerWalk, "_load_layer", fail)
    cache = tmp_path / "states"
    with pytest.raises(KeyboardInterrupt), LayerWalk.open(model_dir, cache=cache) as walk:
        collect(None, arch, _windows(), gradients=True, walk=walk, progress=False)
    assert list(cache.iterdir()) == []


def test_router_statistics_offloaded_equal_in_memory(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`collect_router` on a walk opened on the checkpoint (one layer at a time) gives
    every MoE layer's router tables and expert-channel scores of the loaded model's
    walk, bit for bit, and a budget's unit tables (`UnitTables`, every layer's KV
    groups, the dense layer's channels), each scored while its layer alone is loaded."""
    from transformers import AutoModelForCausalLM

    from plangen.metrics.router import collect_router
    from plangen.scores import UnitTables

    model_dir = models["qwen2_moe"]
    ckpt = load_checkpoint_facts(model_dir)
    facts = _facts(model_dir)
    moe = [i for i in range(facts.layers or 0) if facts.is_moe_layer(i)]
    assert moe == [0, 2], "the tiny qwen2_moe has MoE layers around a dense one"
    experts, windows = facts.experts or 0, _windows()

    def run(model: torch.nn.Module | None, walk: LayerWalk | None) -> tuple[dict, UnitTables]:
        units = UnitTables(ckpt.arch, facts, "wanda")
        stats = collect_router(
            model, ckpt.arch, moe, experts, windows, batch_size=BATCH, progress=False,
            also=units.watch, after=units.score, walk=walk,
        )  # fmt: skip
        return stats, units

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want, want_units = run(full, None)
    del full
    loads = _one_at_a_time(monkeypatch)
    opened: list[LayerWalk] = []
    _spy_metrics(monkeypatch, lambda _m, layer: _alone(opened[0], layer.index))
    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        opened.append(walk)
        got, got_units = run(None, walk)
        assert _materialized(walk) == []
    assert loads == [0, 1, 2]
    assert sorted(got) == sorted(want) == moe
    for k in moe:
        g, w = got[k].tables(), want[k].tables()
        assert sorted(g) == sorted(w)
        for name, table in w.items():
            assert np.array_equal(g[name], table), (k, name)
        assert np.array_equal(got[k].expert_channels, want[k].expert_channels)
    assert list(got_units.tables) == list(want_units.tables) == [
        "wanda.0.attn", "wanda.1.attn", "wanda.1.mlp", "wanda.2.attn",
    ]  # fmt: skip
    for name, table in want_units.tables.items():
        assert np.array_equal(got_units.tables[name], table), name
    assert got_units.stats == {}  # each layer's statistics dropped once scored
