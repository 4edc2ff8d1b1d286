"""The reverse sweep (`LayerWalk.backward_sweep`) gives a full model's gradients, bit for bit.

Reference: the full model (`from_pretrained`), one backward per batch of the
batch's mean next-token loss (`executor.lm_loss.next_token_loss`, as
`plangen.calibrate.collect` does it), the decoder layers' parameters
accumulating `.grad` over the batches and a hook on each parameter squaring
every batch's gradient (the Fisher term's input). The sweep recomputes each
layer alone from its stored input and back-propagates the gradient handed
down from the layer above: the same operations on the same numbers, so the
sums are equal with `torch.equal`, not within a tolerance, on every family
(MoE routing included: the recomputed router logits are bit-identical, so
the same experts are chosen).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor import lm_loss
from executor.layerwise import LayerWalk
from tests.helpers.layerwise import FAMILIES, build, materialized, on_meta, token_windows

BATCH = 2  # five windows: batches of 2, 2 and 1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    return {f: build(root, f) for f in FAMILIES}


Tables = dict[str, torch.Tensor]  # "layer.name" -> tensor


def _full_model_gradients(
    model_dir: Path, windows: list[list[int]]
) -> tuple[Tables, Tables, float]:
    """Summed gradients, summed per-batch squared gradients and the mean loss of a full
    model's per-batch backward over the windows."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = full.get_submodule("model.layers")
    for p in full.parameters():
        p.requires_grad_(False)
    key = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            p.requires_grad_(True)
            key[id(p)] = f"{i}.{name}"
    squares: Tables = {}

    def square(k: str):
        def hook(g: torch.Tensor) -> None:
            squares[k] = g * g if k not in squares else squares[k] + g * g

        return hook

    handles = [p.register_hook(square(key[id(p)])) for p in layers.parameters()]
    total, count = 0.0, 0
    for s in range(0, len(windows), BATCH):
        ids = torch.tensor(windows[s : s + BATCH])
        loss = lm_loss.next_token_loss(full, ids)
        total += float(loss.detach()) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
        loss.backward()
    for h in handles:
        h.remove()
    sums = {key[id(p)]: p.grad for p in layers.parameters() if p.grad is not None}
    return sums, squares, total / count


def _sweep(
    walk: LayerWalk, source: object, fused: bool = False, **kw: object
) -> tuple[Tables, Tables, float]:
    """The summed gradients, the per-batch squares and the loss of `backward_sweep` (or,
    `fused`, of `fused_sweep` on the inputs' states `source`)."""
    sums: Tables = {}
    squares: Tables = {}

    def on_batch(i: int, _k: int, _module: torch.nn.Module, grads: Tables) -> None:
        for name, g in grads.items():
            k = f"{i}.{name}"
            squares[k] = g * g if k not in squares else squares[k] + g * g

    def on_layer(i: int, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if p.grad is not None:
                sums[f"{i}.{name}"] = p.grad.clone()

    sweep = walk.fused_sweep if fused else walk.backward_sweep
    loss = sweep(source, on_layer, on_batch=on_batch, **kw)  # type: ignore[operator]
    return sums, squares, loss


@pytest.mark.parametrize("resident", [False, True], ids=["layerwise", "resident"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_equals_full_backward(models: dict[str, Path], family: str, resident: bool) -> None:
    windows = token_windows()
    want_sums, want_squares, want_loss = _full_model_gradients(models[family], windows)
    with LayerWalk.open(models[family], resident=resident, batch_size=BATCH) as walk:
        sums, squares, loss = _sweep(walk, windows)
        assert loss == walk.loss(walk.run(windows)) == want_loss
    assert sorted(sums) == sorted(want_sums) and sorted(squares) == sorted(want_squares)
    for k, g in want_sums.items():
        assert torch.equal(sums[k], g), k
        assert torch.equal(squares[k], want_squares[k]), k
    # Not vacuous: every layer's attention gets a nonzero gradient.
    for i in range(2):
        assert any(k.startswith(f"{i}.self_attn.") and g.abs().sum() > 0 for k, g in sums.items())


def test_sweep_holds_one_layer_at_a_time(models: dict[str, Path]) -> None:
    """During the sweep exactly the layer being back-propagated is materialized (and the
    head only during the head step); after it, everything is back on meta."""
    seen: list[tuple[str, int, list[int]]] = []
    with LayerWalk.open(models["qwen2_moe"], batch_size=BATCH) as walk:

        def on_batch(i: int, k: int, module: torch.nn.Module, _grads: Tables) -> None:
            assert module is walk.layers[i]
            seen.append(("batch", i, materialized(walk)))

        def on_layer(i: int, _module: torch.nn.Module) -> None:
            seen.append(("layer", i, materialized(walk)))

        walk.backward_sweep(token_windows(), on_layer, on_batch=on_batch)
        assert on_meta(walk.model)
    assert [s for s in seen if s[0] == "layer"] == [("layer", 1, [1]), ("layer", 0, [0])]
    assert all(m == [i] for _, i, m in seen)
    assert len(seen) == 2 * (3 + 1)


def test_boundaries_on_disk_are_removed_as_the_sweep_passes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Boundary states (and the gradients handed down) in a disk cache give the same
    gradients; each boundary's files are gone once its layer is done."""
    windows = token_windows()
    with LayerWalk.open(models["gemma3_text"], batch_size=BATCH) as walk:
        want, _, want_loss = _sweep(walk, windows)
    cache = tmp_path / "cache"
    with LayerWalk.open(models["gemma3_text"], batch_size=BATCH, cache=cache) as walk:
        bounds = walk.boundaries(windows)
        assert len(bounds) == walk.num_layers + 1
        assert len(list(cache.iterdir())) == len(bounds)
        got, _, loss = _sweep(walk, bounds)
        assert list(cache.iterdir()) == []
    assert loss == want_loss
    assert all(torch.equal(got[k], g) for k, g in want.items())


def test_wants_picks_parameters(models: dict[str, Path]) -> None:
    """Only the chosen parameters get gradients, and their values do not change."""
    windows = token_windows()
    with LayerWalk.open(models["llama"], batch_size=BATCH) as walk:
        everything, _, _ = _sweep(walk, windows)
        some, _, _ = _sweep(walk, windows, wants=lambda i, name: name.endswith("o_proj.weight"))
    assert sorted(some) == ["0.self_attn.o_proj.weight", "1.self_attn.o_proj.weight"]
    assert all(torch.equal(g, everything[k]) for k, g in some.items())


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe"])
def test_sweep_feeds_calibration_tables(models: dict[str, Path], family: str) -> None:
    """The sweep folded into `LayerStats` (the first-order scores from the sums over
    batches, the Fisher term per unit) equals `plangen.calibrate.collect`'s gradient
    pass on the full model, bit for bit."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.analyze import model_facts
    from plangen.calibrate import collect
    from plangen.metrics.inputs import LayerInputs, LayerStats
    from plangen.metrics.taylor import taylor, taylor_vec
    from plangen.metrics.units import Accumulator
    from plangen.scores import geometry

    model_dir = models[family]
    ck = load_checkpoint_facts(model_dir)
    geom = geometry(model_facts(ck))
    windows = token_windows()
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first = {"taylor": taylor, "taylor_vec": taylor_vec}
    calib = collect(
        full, ck.arch, windows, metrics=[*first, "taylor2"], gradients=True, fisher=True,
        geom=geom, batch_size=BATCH, progress=False,
    )  # fmt: skip
    specs = {s.name: s for s in ck.arch.attention + ck.arch.dense_mlp}
    stats = [LayerStats(fisher=Accumulator(geom)) for _ in range(2)]

    def on_batch(i: int, _k: int, module: torch.nn.Module, grads: Tables) -> None:
        for name, g in grads.items():
            stats[i].add_fisher(specs[name], module.get_parameter(name), g)

    def on_layer(i: int, module: torch.nn.Module) -> None:
        summed = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        layer = LayerInputs.of(module, ck.arch, i, stats[i], geom, grads=summed)
        stats[i].scores = {name: score(layer) for name, score in first.items()}

    with LayerWalk.open(model_dir, batch_size=BATCH) as walk:
        loss = walk.backward_sweep(
            windows, on_layer, on_batch=on_batch, wants=lambda i, name: name in specs
        )
    assert loss == calib.loss
    for got, want in zip(stats, calib.layers, strict=True):
        for name in first:
            assert np.array_equal(got.scores[name].groups, want.scores[name].groups), name
            assert np.array_equal(got.scores[name].channels, want.scores[name].channels), name
        assert torch.equal(got.fisher.groups, want.fisher.groups)
        assert torch.equal(got.fisher.channels, want.fisher.channels)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_sweep_equals_full_backward_and_passes_the_walks_states(
    models: dict[str, Path], family: str
) -> None:
    """`fused_sweep` (forward and backward batch by batch, nothing recomputed) gives the
    full model's sums, per-batch squares and loss bit for bit, like the sweep, and
    `on_forward` sees each layer's input and output as the layer walk computes them."""
    windows = token_windows()
    want_sums, want_squares, want_loss = _full_model_gradients(models[family], windows)
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def on_forward(i: int, k: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        assert not h_in.requires_grad and not h_out.requires_grad
        seen[(i, k)] = (h_in, h_out)

    with LayerWalk.open(models[family], resident=True, batch_size=BATCH) as walk:
        sums, squares, loss = _sweep(walk, walk.inputs(windows), fused=True, on_forward=on_forward)
        assert all(p.grad is None for p in walk.model.parameters())
        bounds = walk.boundaries(windows)
        for (i, k), (h_in, h_out) in seen.items():
            assert torch.equal(h_in, bounds[i].get(k)), (i, k)
            assert torch.equal(h_out, bounds[i + 1].get(k)), (i, k)
    assert loss == want_loss
    assert sorted(sums) == sorted(want_sums) and sorted(squares) == sorted(want_squares)
    for k, g in want_sums.items():
        assert torch.equal(sums[k], g), k
        assert torch.equal(squares[k], want_squares[k]), k
    assert len(seen) == 2 * 3  # two layers, three batches


def test_fused_sweep_refuses_a_walk_that_is_not_resident(models: dict[str, Path]) -> None:
    with (
        LayerWalk.open(models["llama"], batch_size=BATCH) as walk,
        pytest.raises(ValueError, match="resident"),
    ):
        walk.fused_sweep(walk.inputs(token_windows()))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_calibration_fused_equals_the_layer_walk(models: dict[str, Path], family: str) -> None:
    """`collect` with the forward walk and the sweep fused (batch by batch) measures
    what the layer walk and its reverse sweep measure, bit for bit: depth statistics,
    projection-input moments, every width metric (forward-only and gradient), the
    Fisher term, an observer's Grams and the loss."""
    import numpy as np

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.analyze import model_facts
    from plangen.calibrate import collect
    from plangen.metrics.registry import WIDTH_METRIC_NAMES
    from plangen.reconstruct import SharedGrams
    from plangen.scores import dense_layers, geometry

    model_dir = models[family]
    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    geom = geometry(facts)
    windows = token_windows()
    got = {}
    for fused in (False, True):
        grams = SharedGrams(ck.arch)
        with LayerWalk.open(model_dir, resident=True, batch_size=BATCH) as walk:
            calib = collect(
                None, ck.arch, windows, metrics=list(WIDTH_METRIC_NAMES),
                scored=dense_layers(facts), gradients=True, fisher=True, geom=geom,
                progress=False, walk=walk, observers=[grams], fused=fused,
            )  # fmt: skip
        got[fused] = (calib, grams)
    (a, ga), (b, gb) = got[False], got[True]
    assert a.loss == b.loss and (a.batches, a.tokens) == (b.batches, b.tokens)
    assert a.depth.block_influence() == b.depth.block_influence()
    assert a.depth.angular_distance() == b.depth.angular_distance()
    scored = 0
    for x, y in zip(a.layers, b.layers, strict=True):
        assert sorted(x.scores) == sorted(y.scores)
        for name in x.scores:
            assert np.array_equal(x.scores[name].groups, y.scores[name].groups), name
            assert np.array_equal(x.scores[name].channels, y.scores[name].channels), name
            scored += 1
        for m in ("attn_in", "mlp_in"):
            mx, my = getattr(x, m), getattr(y, m)
            assert mx.count == my.count
            if mx.total is not None:
                assert torch.equal(mx.total, my.total) and torch.equal(mx.squares, my.squares)
        if x.fisher is not None:
            assert torch.equal(x.fisher.groups, y.fisher.groups)
            assert torch.equal(x.fisher.channels, y.fisher.channels)
    assert scored > 0 or not dense_layers(facts)  # the MoE model's layers are all MoE
    assert sorted(ga.grams) == sorted(gb.grams) and ga.grams
    assert all(torch.equal(ga.grams[k], gb.grams[k]) for k in ga.grams)
