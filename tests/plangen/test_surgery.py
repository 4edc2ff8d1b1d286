"""`plangen.surgery.masked_experts`: dropped experts masked in one model, nothing else.

The masking used to replace `torch.nn.functional.linear` for the whole process
while it was active; it now wraps the forward of the masked routers of that
model instance. These tests pin both halves: the masked model computes exactly
what the process-wide patch computed (`_patched_reference`, the previous
implementation, kept here as the reference), and another model, another
instance of the same family, or a plain `F.linear` call are untouched meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from executor.loader import load
from plangen.surgery import masked_experts, moe_modules
from tests.helpers.models import logits, tokens


@contextlib.contextmanager
def _patched_reference(
    layers: Sequence[Any], dropped: Mapping[int, Sequence[int]], experts: int
) -> Iterator[None]:
    """The previous `masked_experts` (main at 70300d4), routers without a correction
    bias only: every `F.linear` call with a masked router's weight, anywhere in the
    process, got -inf at the dropped experts."""
    masks = {}
    for k, gone in dropped.items():
        mods = moe_modules(layers[k], experts)
        if gone and mods is not None:
            masks[id(mods.router.weight)] = sorted(gone)
    real = F.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
        out = real(x, weight, bias)
        gone = masks.get(id(weight))
        if gone is not None:
            out = out.clone()
            out[..., gone] = -torch.inf
        return out

    F.linear = linear
    try:
        yield
    finally:
        F.linear = real


FIXTURE_DROPS = {0: [3, 7, 11], 2: [0], 5: [1, 2, 3, 4, 5, 6, 7, 8]}


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_output_equals_the_process_wide_patch(qwen2moe_dir: Path, dtype) -> None:
    model = load(qwen2moe_dir, "cpu", dtype)
    layers = model.model.layers
    ids = tokens(vocab=8192, length=24)
    whole = logits(model, ids)
    with _patched_reference(layers, FIXTURE_DROPS, 16):
        want = logits(model, ids)
    with masked_experts(layers, FIXTURE_DROPS, 16):
        got = logits(model, ids)
    assert not torch.equal(want, whole)  # the drops change the output: the test can fail
    assert torch.equal(got, want)
    assert torch.equal(logits(model, ids), whole)  # and leave no trace
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.model
def test_another_model_and_f_linear_are_untouched_meanwhile(qwen2moe_dir: Path) -> None:
    masked = load(qwen2moe_dir, "cpu", torch.float32)
    other = load(qwen2moe_dir, "cpu", torch.float32)  # same family, same weights
    ids = tokens(vocab=8192, length=24)
    before = logits(other, ids)
    router = moe_modules(masked.model.layers[0], 16)
    assert router is not None
    weight = router.router.weight
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(1))
    plain = F.linear(x, weight)
    real = F.linear
    with masked_experts(masked.model.layers, FIXTURE_DROPS, 16):
        assert F.linear is real
        # The masked router's own weight, used outside its forward: not masked.
        assert torch.equal(F.linear(x, weight), plain)
        assert torch.isfinite(F.linear(x, weight)).all()
        assert torch.equal(logits(other, ids), before)
        assert not torch.equal(logits(masked, ids), before)
    assert torch.equal(logits(masked, ids), before)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_every_family_masks_as_the_process_wide_patch(arch: str, tmp_path: Path) -> None:
    """The families whose router computes `F.linear(hidden, weight)` (DeepSeek-V3 masks
    through its correction bias, unchanged; `test_experts` checks it against apply)."""
    from tests.helpers.models import make_tiny_model

    model = load(make_tiny_model(tmp_path, arch), "cpu", torch.float32)
    layers = model.model.layers
    drops = {0: [1], 1: [0, 3]}
    ids = tokens()
    with _patched_reference(layers, drops, 4):
        want = logits(model, ids)
    with masked_experts(layers, drops, 4):
        got = logits(model, ids)
    assert not torch.equal(want, logits(model, ids))
    assert torch.equal(got, want)


def test_applied_layer_changes_its_layer_only_and_restores_it_bit_for_bit(
    tmp_path: Path,
) -> None:
    """Layer 1 of a Qwen2-MoE under a candidate that changes both layers: its KV group's
    o_proj columns (with the `compensate` hook), its experts dropped (rescaled) and
    narrowed, its shared expert narrowed; layer 0 untouched. On exit every tensor is
    bit for bit what it was, and no hook or instance forward is left."""
    import numpy as np

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.analyze import model_facts
    from plangen.candidate import Candidate
    from plangen.scores import ScoreTables
    from plangen.surgery import applied_layer
    from tests.helpers.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2_moe")
    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    model = load(model_dir, "cpu", torch.float32)
    layers = model.model.layers
    rng = np.random.default_rng(0)
    scores = ScoreTables(
        {
            "mean_in.1.attn": rng.standard_normal(64),
            "router_prob.1.experts": rng.dirichlet(np.ones(4)),
            "wanda.1.experts_ffn": rng.random((4, 32)),
            "wanda.1.shared": rng.random(48),
        },
        {},
    )
    cand = Candidate(
        "moe",
        "",
        groups_dropped={0: (0,), 1: (1,)},
        compensate=True,
        experts_dropped={0: (0,), 1: (2,)},
        experts_rescale=True,
        expert_width=16,
        shared_width=24,
        moe_layers=(1,),
        width_metric="wanda",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with applied_layer(layers[1], 1, ck.arch, facts, cand, scores):
        inside = model.state_dict()
        changed = sorted(k for k, v in before.items() if not torch.equal(inside[k], v))
        mods = moe_modules(layers[1], 4)
        assert mods is not None and "forward" in vars(mods.router)
        assert layers[1].self_attn.o_proj._forward_hooks
    assert changed == [
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.shared_expert.down_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in model.modules())
