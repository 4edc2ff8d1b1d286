"""Width scores equal a direct reference computation on a tiny model.

The reference for each metric is written out from its definition with plain
torch on the whole calibration set at once (every input captured, one
backward per batch by hand), independent of `plangen.calibrate`'s running sums
and of `plangen.metrics.units`' folding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from plangen.analyze import model_facts
from plangen.calibrate import collect
from plangen.scores import compute_tables

L = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("w"), "qwen2", num_hidden_layers=L)
    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(3, 128, (4, 12), generator=g).tolist()
    from plangen.scores import dense_layers, geometry

    names = ["magnitude", "wanda", "fluctuation", "flap", "taylor", "taylor_vec", "taylor2"]
    calib = collect(
        model,
        ck.arch,
        windows,
        metrics=names,
        scored=dense_layers(facts),
        seed=3,
        gradients=True,
        fisher=True,
        geom=geometry(facts),
        batch_size=2,
        progress=False,
    )
    tables = compute_tables(facts, calib, names)
    return model, windows, facts, tables


def _inputs(model, windows, module_name: str) -> torch.Tensor:
    """Every input row the module sees over the windows, (tokens, in_features), float64."""
    rows = []
    module = model.get_submodule(module_name)
    h = module.register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=torch.tensor(windows), use_cache=False)
    h.remove()
    return torch.cat(rows).double()


def _grads(model, windows, batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Summed and squared-summed gradients, one backward per batch of `batch` windows."""
    total: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    for i in range(0, len(windows), batch):
        model.zero_grad()
        ids = torch.tensor(windows[i : i + batch])
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None and ".layers." in name:
                g = p.grad.double()
                total[name] = total.get(name, 0) + g
                squares[name] = squares.get(name, 0) + g * g
    model.zero_grad()
    return total, squares


def _groups_q(col: torch.Tensor, kv: int) -> np.ndarray:
    """A per-column score over q (heads*head_dim) summed per KV group (contiguous heads)."""
    return col.reshape(kv, -1).sum(1).numpy()


def _layer_units(elem: dict[str, torch.Tensor], i: int, kv: int, head_dim: int) -> tuple:
    """Element scores of one layer's tensors folded by hand onto KV groups and channels."""
    p = f"model.layers.{i}."
    groups = _groups_q(elem[p + "self_attn.q_proj.weight"].sum(1), kv)
    groups = groups + _groups_q(elem[p + "self_attn.q_proj.bias"], kv)
    for t in ("k_proj.weight", "v_proj.weight"):
        groups = groups + elem[p + "self_attn." + t].sum(1).reshape(kv, head_dim).sum(1).numpy()
    for t in ("k_proj.bias", "v_proj.bias"):
        groups = groups + elem[p + "self_attn." + t].reshape(kv, head_dim).sum(1).numpy()
    groups = groups + _groups_q(elem[p + "self_attn.o_proj.weight"].sum(0), kv)
    channels = (
        elem[p + "mlp.gate_proj.weight"].sum(1)
        + elem[p + "mlp.up_proj.weight"].sum(1)
        + elem[p + "mlp.down_proj.weight"].sum(0)
    ).numpy()
    return groups, channels


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in model.named_parameters()}


def test_activation_scores_equal_their_definitions(setup) -> None:
    model, windows, facts, tables = setup
    kv = facts.kv_heads
    for i in range(L):
        for part, mod, space in (
            ("attn", "self_attn.o_proj", "q"),
            ("mlp", "mlp.down_proj", "ffn"),
        ):
            x = _inputs(model, windows, f"model.layers.{i}.{mod}")
            w = model.get_submodule(f"model.layers.{i}.{mod}").weight.detach().double()
            wanda = (w.abs() * x.pow(2).mean(0).sqrt()).sum(0)
            fluct = x.var(0, unbiased=False) * w.pow(2).sum(0)
            if space == "q":
                np.testing.assert_allclose(
                    tables.tables[f"wanda.{i}.attn"], _groups_q(wanda, kv), rtol=1e-5
                )
                np.testing.assert_allclose(
                    tables.tables[f"fluctuation.{i}.attn"], _groups_q(fluct, kv), rtol=1e-5
                )
                z = fluct**2
                z = (z - z.mean()) / z.std()
                np.testing.assert_allclose(
                    tables.tables[f"flap.{i}.attn"],
                    z.reshape(kv, -1).mean(1).numpy(),
                    rtol=1e-6,
                    atol=1e-6,  # z-scores are O(1); batches are summed in float32
                )
            else:
                np.testing.assert_allclose(
                    tables.tables[f"wanda.{i}.mlp"], wanda.numpy(), rtol=1e-5
                )
                np.testing.assert_allclose(
                    tables.tables[f"fluctuation.{i}.mlp"], fluct.numpy(), rtol=1e-5
                )
                z = (fluct - fluct.mean()) / fluct.std()
                np.testing.assert_allclose(
                    tables.tables[f"flap.{i}.mlp"], z.numpy(), rtol=1e-6, atol=1e-6
                )
            np.testing.assert_allclose(
                tables.tables[f"mean_in.{i}.{part}"], x.mean(0).numpy(), rtol=1e-5, atol=1e-8
            )


def test_gradient_scores_equal_their_definitions(setup) -> None:
    model, windows, facts, tables = setup
    total, squares = _grads(model, windows, batch=2)
    w = _weights(model)
    kv, hd = facts.kv_heads, facts.head_dim
    first = {n: (w[n] * g).abs() for n, g in total.items()}
    signed = {n: w[n] * g for n, g in total.items()}
    second = {n: 0.5 * w[n] ** 2 * squares[n] for n in total}
    for i in range(L):
        for name, elem, post in (
            ("taylor", first, None),
            ("taylor_vec", signed, np.abs),
            ("taylor2", second, None),
        ):
            groups, channels = _layer_units(elem, i, kv, hd)
            if post is not None:
                groups, channels = post(groups), post(channels)
            # fp32 gradients by two routes (the sliced head loss, autograd through
            # the model's logits): they agree to a few units in the fourth digit.
            np.testing.assert_allclose(
                tables.tables[f"{name}.{i}.attn"], groups, rtol=1e-3, atol=1e-12
            )
            np.testing.assert_allclose(
                tables.tables[f"{name}.{i}.mlp"], channels, rtol=1e-3, atol=1e-12
            )


def test_magnitude_is_the_executors_magnitude(setup) -> None:
    model, _windows, facts, tables = setup
    w = _weights(model)
    sq = {n: t**2 for n, t in w.items()}
    for i in range(L):
        groups, channels = _layer_units(sq, i, facts.kv_heads, facts.head_dim)
        np.testing.assert_allclose(
            tables.tables[f"magnitude.{i}.mlp"], np.sqrt(channels), rtol=1e-12
        )
        np.testing.assert_allclose(
            tables.tables[f"magnitude.{i}.attn"], np.sqrt(groups), rtol=1e-12
        )


def test_calibration_loss_is_the_models_mean_loss(setup) -> None:
    model, windows, _facts, tables = setup
    ids = torch.tensor(windows)
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert float(tables.tables["calibration_loss"][0]) == pytest.approx(want, rel=1e-6)


def test_random_baseline_is_seeded_per_layer(setup) -> None:
    from plangen.metrics.baseline import random_scores
    from plangen.metrics.inputs import LayerInputs

    _model, _windows, facts, _tables = setup
    from plangen.scores import geometry

    def scores(seed: int, layer: int) -> np.ndarray:
        return random_scores(LayerInputs(layer, {}, (), None, geometry(facts), seed)).channels  # type: ignore[arg-type]

    assert np.array_equal(scores(3, 1), scores(3, 1))
    assert not np.array_equal(scores(3, 1), scores(4, 1))
    assert not np.array_equal(scores(3, 0), scores(3, 1))
    assert scores(3, 0).shape == (facts.ffn,)
