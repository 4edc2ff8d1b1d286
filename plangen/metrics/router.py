"""Router statistics of mixture-of-experts layers, and NAEE's per-layer expert search.

One forward pass over the calibration windows, with a hook on every MoE
layer's router and one on its experts, measures per expert (higher = keep):

* `frequency`: the fraction of tokens that route to it (among their top-k);
* `routing_weight`: its mean routing weight over all tokens (0 where it is not
  chosen): how much of the layer's output it carries;
* `router_prob`: its mean router probability (softmax over all experts);
* `reap`: REAP's saliency, the mean over the tokens routed to it of routing
  weight x the norm of its output.

`naee` (Lu et al., "Not All Experts are Equal") is a search, not a statistic:
per layer, the experts are removed greedily, each time the one whose removal
(tokens re-routed among the others, as the executor's result will route them)
changes the MoE block's output least on the calibration inputs; the score is
the removal order. It runs layer by layer over cached states (the executor's
walk, `executor.layerwise.LayerWalk`, resident over the loaded model), each
layer seeing the layers before it already pruned at the candidate count.

The router and the experts are found in the loaded model, not named: the
decoder layer's submodule whose `weight` is (experts, hidden) and that has a
`top_k` is the router, its sibling with 3-D `gate_up_proj` and `down_proj` the
experts (transformers 5 keeps every family's experts fused in memory, whatever
the checkpoint's form). A dropped expert is simulated by setting its router
logit to -inf (`masked_experts`), so each family's own softmax, top-k and
renormalization decide the rest: exactly what the pruned model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from executor.layerwise import LayerWalk, States, StopLayer
from plangen.heldout import Variant, walk_losses
from plangen.surgery import MoeModules, experts_removed, moe_modules

ROUTER_METRICS = ("frequency", "routing_weight", "router_prob", "reap")
NAEE = "naee"
EXPERT_METRICS = (*ROUTER_METRICS, NAEE)


@dataclass
class RouterStats:
    """Running per-expert sums of one MoE layer (float64)."""

    experts: int
    tokens: int = 0
    chosen: np.ndarray | None = None  # times routed to
    weight: np.ndarray | None = None  # sum of routing weights
    prob: np.ndarray | None = None  # sum of router probabilities
    saliency: np.ndarray | None = None  # sum over routed tokens of weight x output norm
    channel_energy: np.ndarray | None = None  # (experts, expert_ffn): sum of (w x h)^2
    expert_ffn: int = 0
    shared_energy: np.ndarray | None = None  # (shared_ffn,): sum of the shared input^2

    def __post_init__(self) -> None:
        for name in ("chosen", "weight", "prob", "saliency"):
            setattr(self, name, np.zeros(self.experts, dtype=np.float64))
        self.channel_energy = np.zeros((self.experts, self.expert_ffn), dtype=np.float64)

    expert_channels: np.ndarray | None = None  # (experts, expert_ffn) Wanda-style scores
    shared_channels: np.ndarray | None = None  # (shared_ffn,)

    def score_channels(self, mods: MoeModules) -> None:
        """Wanda's structured score of every expert channel: the norm of its down-
        projection column times the root of its routed activation energy (what the
        channel can add to the layer's output), and the same for the shared expert."""
        with torch.no_grad():
            cols = mods.experts.down_proj.detach().double().norm(dim=1).cpu().numpy()  # (E, I)
            assert self.channel_energy is not None
            self.expert_channels = cols * np.sqrt(self.channel_energy)
            if mods.shared is not None and self.shared_energy is not None:
                w = mods.shared.weight.detach().double().norm(dim=0).cpu().numpy()
                self.shared_channels = w * np.sqrt(self.shared_energy)

    def tables(self) -> dict[str, np.ndarray]:
        assert self.chosen is not None and self.weight is not None
        assert self.prob is not None and self.saliency is not None
        t = max(self.tokens, 1)
        return {
            "frequency": self.chosen / t,
            "routing_weight": self.weight / t,
            "router_prob": self.prob / t,
            "reap": np.divide(
                self.saliency, self.chosen, out=np.zeros_like(self.saliency), where=self.chosen > 0
            ),
        }


def _router_hook(stats: RouterStats) -> Any:
    def hook(_m: Any, _args: Any, out: Any) -> None:
        logits, weights, index = out[0], out[1], out[2]
        logits = logits.detach().reshape(-1, stats.experts).float()
        idx = index.detach().reshape(logits.shape[0], -1).cpu()
        w = weights.detach().reshape(idx.shape).double().cpu()
        stats.tokens += logits.shape[0]
        stats.prob += torch.softmax(logits, dim=-1).double().sum(0).cpu().numpy()
        flat = idx.reshape(-1).numpy()
        stats.chosen += np.bincount(flat, minlength=stats.experts)[: stats.experts]
        stats.weight += np.bincount(flat, weights=w.reshape(-1).numpy(), minlength=stats.experts)[
            : stats.experts
        ]

    return hook


def _experts_hook(stats: RouterStats) -> Any:
    """REAP: each routed expert's output norm, recomputed by the experts module itself
    on its own tokens (one expert, weight 1), times the token's routing weight; and
    each expert channel's routed activation energy, sum of (weight x act(gate) x up)^2,
    for the width scores. The activation is computed from the fused weights (gate
    rows, then up rows) and checked against the module's own output, so a layout this
    reading gets wrong is an error, not a silent score."""

    busy = False  # the hook calls the module it is on: not again from inside

    def hook(module: Any, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal busy
        if busy:
            return
        hidden, index, weights = args[0], args[1], args[2]
        busy = True
        with torch.no_grad():
            for e in torch.unique(index).tolist():
                if not 0 <= e < stats.experts:
                    continue
                rows, pos = torch.where(index == e)
                x = hidden[rows]
                one = torch.full((len(rows), 1), e, dtype=index.dtype, device=index.device)
                out = module(x, one, torch.ones(len(rows), 1, dtype=x.dtype, device=x.device))
                norms = out.float().norm(dim=-1).double()
                w = weights[rows, pos].double()
                stats.saliency[e] += float((w * norms).sum())
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                mine = torch.nn.functional.linear(h, module.down_proj[e])
                if not torch.allclose(mine.float(), out.float(), rtol=1e-3, atol=1e-4):
                    raise ValueError(
                        f"{type(module).__name__}: its experts do not compute "
                        "down(act(gate) * up) from gate_up_proj's gate and up halves; "
                        "plangen cannot score their channels"
                    )
                energy = (h.double() * w[:, None]).pow(2).sum(0).cpu().numpy()
                stats.channel_energy[e] += energy
        busy = False

    return hook


def _shared_hook(stats: RouterStats) -> Any:
    """The shared expert's channel energy: the sum of its down projection's input^2."""

    def hook(_m: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        s = x.pow(2).sum(0).cpu().numpy()
        stats.shared_energy = s if stats.shared_energy is None else stats.shared_energy + s

    return hook


def collect_router(
    model: Any,
    arch: Any,
    moe_layers: Sequence[int],
    experts: int,
    windows: Sequence[Sequence[int]],
    *,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
    also: Callable[[int, Any], list[Any]] | None = None,
    after: Callable[[int, Any], None] | None = None,
    walk: LayerWalk | None = None,
) -> dict[int, RouterStats]:
    """One forward over `windows`, layer by layer on the executor's walk (`walk`, e.g.
    opened on the checkpoint with one layer in memory at a time; else the walk over
    the loaded `model`, every layer resident): every MoE layer's router statistics
    (no LM head). `also(i, layer)` registers more hooks on layer i for the same pass
    (`calibrate.watch_layer_inputs`: the attention and dense-MLP statistics a
    parameter budget needs) and returns them; `after(i, layer)` is called once layer i
    has run over every batch, its hooks removed, while it is still loaded (to score
    it from those statistics: `scores.UnitTables`)."""
    from tqdm import tqdm

    if walk is None:
        walk = LayerWalk.over(model, arch, device, batch_size)
    wanted = set(moe_layers)
    stats: dict[int, RouterStats] = {}
    states = walk.inputs(windows)
    for i in tqdm(range(walk.num_layers), desc="router", unit="layer", disable=not progress):
        with walk.layer(i) as layer:
            handles = list(also(i, layer)) if also is not None else []
            try:
                mods = moe_modules(layer, experts) if i in wanted else None
                if i in wanted:
                    if mods is None:
                        raise ValueError(
                            f"layer {i} is a MoE layer but has no router the model shows"
                        )
                    stats[i] = RouterStats(
                        experts, expert_ffn=int(mods.experts.down_proj.shape[-1])
                    )
                    handles.append(mods.router.register_forward_hook(_router_hook(stats[i])))
                    handles.append(mods.experts.register_forward_hook(_experts_hook(stats[i])))
                    if mods.shared is not None:
                        handles.append(
                            mods.shared.register_forward_pre_hook(_shared_hook(stats[i]))
                        )
                states = walk.forward_layer(i, states, layer, inplace=True)
            finally:
                for h in handles:
                    h.remove()
            if mods is not None:
                stats[i].score_channels(mods)
            if after is not None:
                after(i, layer)
    return {k: stats[k] for k in moe_layers}


def naee_orders(
    model: Any,
    arch: Any,
    moe_layers: Sequence[int],
    experts: int,
    drop: int,
    windows: Sequence[Sequence[int]],
    *,
    tokens: int | None = None,
    sequential: bool = True,
    prob: Mapping[int, np.ndarray] | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
    walk: LayerWalk | None = None,
) -> dict[int, np.ndarray]:
    """NAEE's greedy elimination, per MoE layer in order: remove `drop` experts one at a
    time, each time the one whose removal changes the block's output least (squared
    error over the block's calibration inputs, the first `tokens` of them if set:
    fewer were measured worse). Layer l is searched
    on inputs from the model with layers < l already pruned. With `prob` (each layer's
    mean router probabilities) the error is that of the `rescale`d result. Returns
    per layer a score per expert, higher = kept longer (the removed ones get their
    removal step). On `walk` (opened on the checkpoint: one layer in memory at a
    time), or the walk over the loaded `model`."""
    from tqdm import tqdm

    if walk is None:
        walk = LayerWalk.over(model, arch, device, batch_size)
    states = walk.inputs(windows)
    orders: dict[int, np.ndarray] = {}
    for k in tqdm(range(walk.num_layers), desc="naee", unit="layer", disable=not progress):
        with walk.layer(k) as layer:
            removed: list[int] = []
            if k in moe_layers:
                removed = _naee_layer(walk, states, k, layer, experts, drop, tokens, prob)
                orders[k] = np.full(experts, float(drop), dtype=np.float64)
                orders[k][removed] = np.arange(len(removed), dtype=np.float64)
            # Layer k's own experts removed (the only layer this forward runs).
            here = {k: removed} if sequential and removed else {}
            with experts_removed(walk.layers, here, experts, prob):
                states = walk.forward_layer(k, states, layer, inplace=True)
    return orders


def _naee_layer(
    walk: LayerWalk,
    states: States,
    k: int,
    layer: Any,
    experts: int,
    drop: int,
    tokens: int | None,
    prob: Mapping[int, np.ndarray] | None,
) -> list[int]:
    """NAEE's greedy search in one loaded MoE layer: the experts removed, in order."""
    mods = moe_modules(layer, experts)
    assert mods is not None
    x = _block_inputs(walk, states, k, mods.block, tokens)
    with torch.no_grad():
        ref = mods.block(x)
    removed: list[int] = []
    for _ in range(drop):
        best, best_err = -1, float("inf")
        for e in range(experts):
            if e in removed:
                continue
            trial = {k: [*removed, e]}
            with experts_removed(walk.layers, trial, experts, prob), torch.no_grad():
                err = float((mods.block(x) - ref).double().pow(2).sum())
            if err < best_err:
                best, best_err = e, err
        removed.append(best)
    return removed


def _block_inputs(
    walk: LayerWalk, states: States, k: int, block: Any, tokens: int | None
) -> torch.Tensor:
    """The first `tokens` (None: all) inputs of layer k's MoE block, as one batch
    (1, tokens, hidden)."""
    got: list[torch.Tensor] = []

    def hook(_m: Any, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise StopLayer

    handle = block.register_forward_pre_hook(hook)
    try:
        for b in range(len(states)):
            if tokens is not None and sum(len(g) for g in got) >= tokens:
                break
            with contextlib.suppress(StopLayer):
                walk.forward_batch(k, states, b)
    finally:
        handle.remove()
    return torch.cat(got)[:tokens].unsqueeze(0)  # [:None] is everything


def removal_curves(
    walk: LayerWalk,
    moe_layers: Sequence[int],
    experts: int,
    order: Mapping[int, Sequence[int]],
    counts: Sequence[int],
    windows: Sequence[Sequence[int]],
    prob: Mapping[int, np.ndarray] | None,
    *,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Per MoE layer, the next-token loss on `windows` with only that layer's first
    `c` experts of `order` dropped (and, `prob` given, rescaled), for every c in
    `counts`, minus the loss of the original: what each layer's drops cost, measured
    (the allocator's input). Returns {layer: losses aligned with `counts`}.

    Every probe and the original in one walk (`heldout.walk_losses`; over the loaded
    model, or opened on the checkpoint): a probe of layer k shares the original's
    states up to k."""
    probes = [(k, c) for k in moe_layers for c in counts if c > 0]
    variants = [None] + [_dropped(k, list(order[k][:c]), experts, prob) for k, c in probes]
    base, *losses = walk_losses(walk, windows, variants, progress=progress, desc="probe")
    measured = dict(zip(probes, losses, strict=True))
    return {
        k: np.asarray([measured[k, c] - base if c else 0.0 for c in counts], dtype=np.float64)
        for k in moe_layers
    }


def _dropped(
    k: int, gone: list[int], experts: int, prob: Mapping[int, np.ndarray] | None
) -> Variant:
    """Layer k's `gone` experts removed (`experts_removed`), the other layers as they are."""
    scale = {0: prob[k]} if prob is not None else None

    def context(i: int, layer: Any) -> Any:
        return experts_removed([layer], {0: gone}, experts, scale) if i == k else None

    return context
