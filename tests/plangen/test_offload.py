"""Calibration on the layer walk (issue 36): `plangen.calibrate.collect` over a walk
opened on the checkpoint, one decoder layer in memory at a time, measures exactly
what it measures over the loaded model (the walk with every layer resident):
depth statistics, projection-input moments, the calibration loss, the summed
gradients and the Fisher term per unit, compared with `torch.equal`; and the MoE
router statistics (`collect_router`) the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from executor.layerwise import LayerWalk
from plangen.calibrate import Calibration, collect
from tests.helpers.models import make_tiny_model

FAMILIES = ("llama", "qwen2_moe")
BATCH = 2  # five windows: batches of 2, 2 and 1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return {
        f: make_tiny_model(root, f, max_position_embeddings=128, initializer_range=0.2)
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


def _geom(model_dir: Path):
    from plangen.analyze import model_facts
    from plangen.scores import geometry

    return geometry(model_facts(load_checkpoint_facts(model_dir)))


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
        assert sorted(g.grad_sum) == sorted(w.grad_sum)
        for name, t in w.grad_sum.items():
            assert torch.equal(g.grad_sum[name], t), name
        if w.fisher is not None:
            assert torch.equal(g.fisher.groups, w.fisher.groups)
            assert torch.equal(g.fisher.channels, w.fisher.channels)


@pytest.mark.parametrize("gradients", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_offloaded_equals_in_memory(
    models: dict[str, Path], family: str, gradients: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = models[family]
    arch = load_checkpoint_facts(model_dir).arch
    geom = _geom(model_dir)
    windows = _windows()
    kw = {"gradients": gradients, "fisher": gradients, "geom": geom, "progress": False}
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = collect(full, arch, windows, batch_size=BATCH, **kw)
    if gradients:
        assert want.layers[0].grad_sum and want.layers[0].fisher is not None
    del full

    loads: list[int] = []
    load = LayerWalk._load_layer

    def one_at_a_time(walk: LayerWalk, i: int) -> torch.nn.Module:
        assert _materialized(walk) == []  # never two decoder layers in memory
        loads.append(i)
        return load(walk, i)

    monkeypatch.setattr(LayerWalk, "_load_layer", one_at_a_time)
    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        got = collect(None, arch, windows, walk=walk, **kw)
        assert _materialized(walk) == []
    n = len(got.layers)
    assert loads == list(range(n)) + (list(reversed(range(n))) if gradients else [])
    _same(got, want)


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


def test_router_statistics_offloaded_equal_in_memory(models: dict[str, Path]) -> None:
    """`collect_router` on a walk opened on the checkpoint (one layer at a time) gives
    every MoE layer's router tables and expert-channel scores of the loaded model's
    walk, bit for bit."""
    from transformers import AutoModelForCausalLM

    from plangen.analyze import model_facts
    from plangen.metrics.router import collect_router

    model_dir = models["qwen2_moe"]
    ckpt = load_checkpoint_facts(model_dir)
    facts = model_facts(ckpt)
    moe = [i for i in range(facts.layers or 0) if facts.is_moe_layer(i)]
    assert moe, "the tiny qwen2_moe has MoE layers"
    experts, windows = facts.experts or 0, _windows()
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = collect_router(full, ckpt.arch, moe, experts, windows, batch_size=BATCH, progress=False)
    del full
    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        got = collect_router(
            None, ckpt.arch, moe, experts, windows, batch_size=BATCH, progress=False, walk=walk
        )
        assert _materialized(walk) == []
    assert sorted(got) == sorted(want) == moe
    for k in moe:
        g, w = got[k].tables(), want[k].tables()
        assert sorted(g) == sorted(w)
        for name, table in w.items():
            assert np.array_equal(g[name], table), (k, name)
        assert np.array_equal(got[k].expert_channels, want[k].expert_channels)
