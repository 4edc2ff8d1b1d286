"""In-memory model surgery: a candidate applied to the loaded model, or to one layer.

What the planner does to a model it measures, undone afterwards bit for bit:
`applied_layer` does it to one decoder layer (the module a layer walk has
loaded), `applied` to every layer of a loaded model. Each zeroes what the
removed units write into the residual stream (a KV group's o_proj columns,
an MLP channel's down_proj column, a dropped layer's output projections,
routed experts masked or narrowed), optionally with solved weights
(`Solved`, from `plangen.reconstruct`) in place; `masked_experts` /
`experts_removed` simulate dropped experts through the router. `heldout`
judges with these, `reconstruct` solves and `metrics.router` measures with
them (walking the decoder layer by layer on `executor.layerwise`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from compiler.architectures import Architecture
from compiler.facts import ModelFacts
from compiler.geometry import complement, top_channels
from compiler.sidecar import table_name
from plangen.calibrate import output_projection
from plangen.candidate import Candidate
from plangen.scores import ScoreTables, geometry


@dataclass(frozen=True)
class Solved:
    """A re-solved projection: the layer, the part (`attn` o_proj / `mlp` down_proj),
    the kept input columns, the new weight of those columns (out x kept) and, when
    the walk chose the channels itself (`by obs`), its ranking of all of them."""

    layer: int
    part: str
    kept: np.ndarray
    weight: torch.Tensor
    ranking: np.ndarray | None = None


@dataclass
class MoeModules:
    """One MoE layer's router, experts and the block holding them (in memory)."""

    block: Any
    router: Any
    experts: Any
    shared: Any = None  # the shared expert's down projection (an nn.Linear), if any


def moe_modules(layer: Any, experts: int) -> MoeModules | None:
    """The MoE modules of a decoder layer, or None for a dense layer."""
    router = None
    path = ""
    for name, module in layer.named_modules():
        w = getattr(module, "weight", None)
        if hasattr(module, "top_k") and isinstance(w, torch.Tensor) and w.shape[0] == experts:
            router, path = module, name
            break
    if router is None:
        return None
    block = layer.get_submodule(path.rpartition(".")[0]) if "." in path else layer
    found = [
        m
        for m in block.children()
        if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(m, "down_proj", None), torch.Tensor)
    ]
    if len(found) != 1:
        raise ValueError(f"{type(block).__name__}: no fused experts module beside the router")
    shared = None
    for name, module in block.named_children():
        if name.startswith("shared_expert") and hasattr(module, "down_proj"):
            shared = module.down_proj  # Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`
    return MoeModules(block, router, found[0], shared)


class _MaskedLogits(TorchFunctionMode):
    """Active during one router's forward only: the logits it computes with its own
    weight (`F.linear(hidden, weight)`) get -inf at the `gone` experts."""

    def __init__(self, weight: torch.Tensor, gone: list[int]):
        super().__init__()
        self.weight = weight
        self.gone = gone

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.weight:
                out = out.clone()
                out[..., self.gone] = -torch.inf
        return out


@contextlib.contextmanager
def _router_masked(router: Any, gone: list[int]) -> Iterator[None]:
    """This router instance (not its class, not `torch`) runs its forward under
    `_MaskedLogits`: whatever the family does with the logits next (softmax, top-k,
    renormalisation, the logits recorded for `output_router_logits`) it does as it
    always does, with the dropped experts out of reach."""
    weight = router.weight
    own = vars(router).get("forward")  # a forward set on the instance (accelerate's hooks)
    inner = router.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _MaskedLogits(weight, gone):
            return inner(*args, **kwargs)

    router.forward = forward
    try:
        yield
    finally:
        if own is None:
            del router.forward
        else:
            router.forward = own


@contextlib.contextmanager
def masked_experts(
    layers: Sequence[Any], dropped: Mapping[int, Sequence[int]], experts: int
) -> Iterator[None]:
    """Inside the block, the `dropped` experts of each layer get a router logit of -inf:
    the model routes as the pruned one will. Only these layers' routers change (for
    the duration of their own forward): another model, or `F.linear` itself, is
    left alone, so the planner may measure two models in one process."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        try:
            for k, gone in dropped.items():
                mods = moe_modules(layers[k], experts)
                if not gone or mods is None:
                    continue
                bias = getattr(mods.router, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    # DeepSeek-V3 selects by sigmoid(logit) + this bias: -inf there is
                    # never chosen, in any dtype (its logits come from a float32 copy of
                    # the weight, which `_router_masked` would not recognise).
                    saved.append((bias, bias.detach().clone()))
                    with torch.no_grad():
                        bias[sorted(gone)] = -torch.inf
                else:
                    stack.enter_context(_router_masked(mods.router, sorted(gone)))
            yield
        finally:
            with torch.no_grad():
                for b, before in saved:
                    b.copy_(before)


@contextlib.contextmanager
def experts_removed(
    layers: Sequence[Any],
    dropped: Mapping[int, Sequence[int]],
    experts: int,
    prob: Mapping[int, np.ndarray] | None = None,
) -> Iterator[None]:
    """The model as the result of dropping these experts: their router logits masked
    (`masked_experts`) and, given each layer's mean router probabilities `prob`
    (`rescale`), the layer's experts scaled by 1 - what the dropped ones took."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for k, gone in dropped.items() if prob is not None else ():
                mods = moe_modules(layers[k], experts)
                if mods is None or not len(gone):
                    continue
                down = mods.experts.down_proj
                saved.append((down, down.detach().clone()))
                down.mul_(1.0 - float(prob[k][list(gone)].sum()))
        with masked_experts(layers, dropped, experts):
            yield
    finally:
        with torch.no_grad():
            for w, before in saved:
                w.copy_(before)


def _removed_columns(
    cand: Candidate, layer: int, space: str, facts: ModelFacts, scores: ScoreTables
) -> np.ndarray | None:
    size = geometry(facts).size(space)
    if layer in cand.drop:
        return np.arange(size)
    kept = cand.kept_inputs(layer, space, facts, scores)
    return None if kept is None else complement(kept, size)


@contextlib.contextmanager
def applied(
    model: Any,
    arch: Architecture,
    facts: ModelFacts,
    cand: Candidate,
    scores: ScoreTables,
    solved: Sequence[Solved] = (),
) -> Iterator[None]:
    """The model behaves as the candidate's result inside the block; `solved` are its
    re-solved projections (`plangen.reconstruct`), written into the kept columns.
    Every decoder layer under `applied_layer`: the whole model is the walk's layers."""
    layers = model.get_submodule(arch.layers_module)
    with contextlib.ExitStack() as stack:
        for i in range(facts.layers or 0):
            stack.enter_context(applied_layer(layers[i], i, arch, facts, cand, scores, solved))
        yield


@contextlib.contextmanager
def applied_layer(
    layer: Any,
    i: int,
    arch: Architecture,
    facts: ModelFacts,
    cand: Candidate,
    scores: ScoreTables,
    solved: Sequence[Solved] = (),
) -> Iterator[None]:
    """Decoder layer `i` (the module itself: what `LayerWalk.layer(i)` yields, its
    parameters named without the layer prefix) behaves as the candidate's layer i
    inside the block, and is restored bit for bit after. One layer at a time is what
    a walk with one layer in memory can change; `applied` is this for every layer.
    `solved`: the candidate's re-solved projections (those of other layers ignored)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_projections_applied(layer, i, arch, facts, cand, scores, solved))
        stack.enter_context(_experts_removed(layer, i, facts, cand, scores))
        yield


@contextlib.contextmanager
def _projections_applied(
    layer: Any,
    i: int,
    arch: Architecture,
    facts: ModelFacts,
    cand: Candidate,
    scores: ScoreTables,
    solved: Sequence[Solved],
) -> Iterator[None]:
    """Layer i's o_proj / down_proj: the removed input columns zeroed (a dropped layer:
    all), solved weights in the kept ones, the `compensate` bias added by a hook."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # weight, cols, values
    handles = []
    rebuilt = {s.part: s for s in solved if s.layer == i}
    try:
        with torch.no_grad():
            for space, part in (("q", "attn"), ("ffn", "mlp")):
                spec = output_projection(arch.attention + arch.dense_mlp, space)
                new = rebuilt.get(part)
                if new is not None:  # the walk's own choice of columns (`by obs`)
                    removed = complement(new.kept, geometry(facts).size(space))
                else:
                    removed = _removed_columns(cand, i, space, facts, scores)
                if spec is None or removed is None or not len(removed):
                    continue
                module = layer.get_submodule(spec.name.removesuffix(".weight"))
                w = module.weight
                cols = torch.from_numpy(removed).to(w.device)
                saved.append((w, cols, w[:, cols].clone()))  # only what is zeroed
                if new is not None:
                    kept = torch.from_numpy(new.kept).to(w.device)
                    saved.append((w, kept, w[:, kept].clone()))
                    w[:, kept] = new.weight.to(w.device, w.dtype)
                if cand.compensate and i not in cand.drop:
                    mean = torch.from_numpy(scores.tables[table_name("mean_in", i, part)])
                    bias = (w.detach().double()[:, cols] @ mean[removed].to(w.device)).to(w.dtype)
                    handles.append(module.register_forward_hook(_add(bias)))
                w[:, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for w, cols, values in saved:
                w[:, cols] = values
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _experts_removed(
    layer: Any, i: int, facts: ModelFacts, cand: Candidate, scores: ScoreTables
) -> Iterator[None]:
    """Layer i's expert widths (`_experts_narrowed`) and expert drops (`experts_removed`,
    rescaled by the layer's `router_prob` when the candidate says), together when it
    has both."""
    with contextlib.ExitStack() as stack:
        narrowed = cand.expert_width is not None or cand.shared_width is not None
        if narrowed and i in cand.moe_layers:
            stack.enter_context(_experts_narrowed(layer, i, facts, cand, scores))
        gone = cand.experts_dropped.get(i)
        if gone:
            prob = None
            if cand.experts_rescale:
                prob = {0: scores.tables[table_name("router_prob", i, "experts")]}
            stack.enter_context(experts_removed([layer], {0: gone}, facts.experts or 0, prob))
        yield


@contextlib.contextmanager
def _experts_narrowed(
    layer: Any, i: int, facts: ModelFacts, cand: Candidate, scores: ScoreTables
) -> Iterator[None]:
    """A `shrink` candidate in MoE layer i: the removed channels' down-projection
    columns zeroed in every routed expert (each by its own row of
    `METRIC.i.experts_ffn`) and in the shared expert (`METRIC.i.shared`), as
    `top_channels` picks them for apply."""
    mods = moe_modules(layer, facts.experts or 0)
    assert mods is not None
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            if cand.expert_width is not None:
                table = scores.tables[table_name(cand.unit_metric, i, "experts_ffn")]
                down = mods.experts.down_proj
                saved.append((down, down.detach().clone()))
                for e in range(down.shape[0]):
                    kept = top_channels(table[e], cand.expert_width)
                    down[e][:, complement(np.asarray(kept), down.shape[-1])] = 0
            if cand.shared_width is not None and mods.shared is not None:
                table = scores.tables[table_name(cand.unit_metric, i, "shared")]
                w = mods.shared.weight
                saved.append((w, w.detach().clone()))
                kept = top_channels(table, cand.shared_width)
                w[:, complement(np.asarray(kept), w.shape[-1])] = 0
        yield
    finally:
        with torch.no_grad():
            for w, before in saved:
                w.copy_(before)


def _add(bias: torch.Tensor) -> Any:
    def hook(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + bias

    return hook
