"""NAEE's greedy expert search (`plangen.metrics.router.naee_orders`): its first pick in
a layer is the expert whose removal changes the block's output least, and the search
gives the same orders on a walk opened on the checkpoint (one layer in memory at a
time) as on the loaded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from executor.layerwise import LayerWalk
from plangen.metrics.router import naee_orders
from plangen.surgery import masked_experts, moe_modules
from tests.helpers.models import make_tiny_model

EXPERTS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("naee"), "qwen2_moe", num_hidden_layers=3, initializer_range=0.2
    )


def _windows() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 128, (5, 12), generator=g).tolist()


def _loaded(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_the_first_pick_changes_the_blocks_output_least(model_dir: Path) -> None:
    model, arch = _loaded(model_dir), load_checkpoint_facts(model_dir).arch
    windows = _windows()
    orders = naee_orders(model, arch, [0, 1, 2], EXPERTS, 1, windows, batch_size=5, progress=False)
    layers = model.model.layers
    block = moe_modules(layers[0], EXPERTS).block
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor(windows), use_cache=False)
    handle.remove()
    x = seen[0].reshape(1, -1, seen[0].shape[-1])
    with torch.no_grad():
        ref = block(x)
        errors = []
        for e in range(EXPERTS):
            with masked_experts(layers, {0: [e]}, EXPERTS):
                errors.append(float((block(x) - ref).double().pow(2).sum()))
    first = int(np.argmin(errors))
    assert orders[0][first] == 0.0
    assert sorted(orders[0]) == [0.0, 1.0, 1.0, 1.0]  # one removed (step 0), the rest kept


@pytest.mark.parametrize("rescaled", [False, True])
def test_naee_on_a_walk_opened_on_the_checkpoint_equals_the_loaded_model(
    model_dir: Path, rescaled: bool
) -> None:
    arch = load_checkpoint_facts(model_dir).arch
    windows = _windows()
    prob = None
    if rescaled:
        rng = np.random.default_rng(0)
        prob = {k: rng.dirichlet(np.ones(EXPERTS)) for k in range(3)}
    kw = dict(prob=prob, batch_size=2, progress=False)
    want = naee_orders(_loaded(model_dir), arch, [0, 1, 2], EXPERTS, 2, windows, **kw)
    with LayerWalk.open(model_dir, batch_size=2) as walk:
        got = naee_orders(None, arch, [0, 1, 2], EXPERTS, 2, windows, walk=walk, **kw)
        assert not any(p.device.type != "meta" for p in walk.layers.parameters())
    assert sorted(got) == sorted(want) == [0, 1, 2]
    for k in want:
        assert np.array_equal(got[k], want[k]), k
