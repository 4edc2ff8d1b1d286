"""Calibration: one pass over the calibration windows, every statistic collected by hooks.

The windows come from `compiler.corpus` (calibration pool only, consecutive
`seqlen` windows from its start), so calibration and `plancc eval` share one
protocol and never overlap. Which modules to watch comes from the
architecture table: the decoder-layer list (`layers_module`) and, per layer,
the output projections, i.e. the tensors whose input axis is the `q` space
(o_proj) or the `ffn` space (down_proj). Nothing here names a module itself.

The statistics are organised as a walk over decoder layers in order: each
layer owns a `LayerStats` that only ever sees that layer's own inputs (the
residual state entering it, the inputs of its two output projections, its
weights' gradients). Today a full forward pass with hooks feeds them; an
offloaded mode for models larger than memory would run one layer at a time on
the cached inputs and feed the same objects, without touching the metrics.

Per batch: one forward (residual states, input moments, the calibration loss)
and, when a gradient metric is asked for, one backward on the same graph;
gradients are summed (first order) and squared-summed (the diagonal Fisher)
per weight, then cleared. Nothing of size layers x tokens x hidden is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.architectures import Architecture, TensorSpec
from compiler.geometry import Geometry
from executor import lm_loss
from plangen.metrics.depth import DepthStats
from plangen.metrics.units import Accumulator, fold_elements


@dataclass
class InputMoments:
    """Running float64 sums of an input's columns: count, sum and sum of squares."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # One batch is summed in its own dtype (float32: a few thousand rows lose
        # nothing that matters), batches are accumulated in float64.
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows if rows.dtype == torch.float64 else rows.float()
        s, q = rows.sum(0).double().cpu(), (rows * rows).sum(0).double().cpu()
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        assert self.total is not None, "no batch was seen"
        return self.total / self.count

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x^2] per column (Wanda's ||X_j||^2 / tokens)."""
        assert self.squares is not None, "no batch was seen"
        return self.squares / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per column (FLAP's fluctuation of the input)."""
        return (self.mean_square - self.mean**2).clamp_min(0.0)


@dataclass
class LayerStats:
    """What one decoder layer's metrics read: its projections' inputs and its gradients."""

    attn_in: InputMoments = field(default_factory=InputMoments)  # o_proj input (q space)
    mlp_in: InputMoments = field(default_factory=InputMoments)  # down_proj input (ffn space)
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # layer-relative name
    # The Fisher term 1/2 * w^2 * g_b^2, summed over batches and folded onto the
    # layer's KV groups and channels as each batch's gradient arrives: one number
    # per unit instead of a second copy of every weight (what lets an 8B model's
    # gradient pass fit one 80 GB card).
    fisher: Accumulator | None = None

    def add_fisher(self, spec: TensorSpec, weight: torch.Tensor, grad: torch.Tensor) -> None:
        wg = weight.detach().float() * grad.detach().float()
        self.fisher.add(fold_elements(0.5 * wg * wg, spec, self.fisher.geom))


@dataclass
class Calibration:
    """Everything one calibration pass measured."""

    depth: DepthStats
    layers: list[LayerStats]
    batches: int
    tokens: int
    loss: float  # mean next-token loss over the calibration windows (NaN: not measured)
    gradients: bool


def output_projection(specs: Sequence[TensorSpec], space: str) -> TensorSpec | None:
    """The weight whose input axis is `space` (o_proj for q, down_proj for ffn)."""
    return next((s for s in specs if s.dims == ("hidden", space)), None)


def module_path(arch: Architecture, layer: int, spec: TensorSpec) -> str:
    return arch.layer_prefix.format(i=layer) + spec.name.removesuffix(".weight")


def _layer_parameters(
    params: dict[str, torch.nn.Parameter], arch: Architecture, layer: int
) -> dict[str, torch.nn.Parameter]:
    """The layer's attention and dense-MLP weights that the table names, by relative name."""
    prefix = arch.layer_prefix.format(i=layer)
    specs = arch.attention + arch.dense_mlp
    return {s.name: params[prefix + s.name] for s in specs if prefix + s.name in params}


def collect(
    model: Any,
    arch: Architecture,
    windows: Sequence[Sequence[int]],
    *,
    gradients: bool = False,
    fisher: bool = False,
    geom: Geometry | None = None,
    checkpointing: bool = False,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> Calibration:
    """One pass over `windows`: depth scores, projection-input moments and, with
    `gradients`, the summed weight gradients of every layer and, with `fisher`
    (which needs the layer `geom`), the Fisher term folded per unit.
    `checkpointing` recomputes each layer's activations in the backward instead
    of keeping them (transformers' gradient checkpointing): what a gradient
    pass over an 8B model needs to fit one 80 GB card; the scores are the same."""
    layers_mod = model.get_submodule(arch.layers_module)
    n = len(layers_mod)
    stats = [LayerStats() for _ in range(n)]
    depth = DepthStats(n)
    states: dict[int, torch.Tensor] = {}
    handles = watch_residual(layers_mod, states)

    handles += watch_inputs(model, arch, stats)

    params = dict(model.named_parameters())
    watched = {k: _layer_parameters(params, arch, k) for k in range(n)} if gradients else {}
    was_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    if gradients:
        handles += _watch_gradients(model, arch, stats, watched, fisher, geom)

    checkpointed = gradients and checkpointing
    if checkpointed:
        _layer_checkpointing(model, layers_mod, True)
    try:
        loss_sum, tokens, batches = _run_batches(
            model, windows, depth, states, gradients, batch_size, device, progress
        )
        for k, per in watched.items():
            for name, p in per.items():
                if p.grad is not None:
                    stats[k].grad_sum[name] = p.grad.detach()
                    p.grad = None
    finally:
        if checkpointed:
            _layer_checkpointing(model, layers_mod, False)
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(was_grad[name])
    return Calibration(depth, stats, batches, tokens, loss_sum / max(tokens, 1), gradients)


def _watch_gradients(
    model: Any,
    arch: Architecture,
    stats: Sequence[LayerStats],
    watched: dict[int, dict[str, torch.nn.Parameter]],
    fisher: bool,
    geom: Geometry | None,
) -> list[Any]:
    """Gradients for the layers' own weights only (not embeddings or norms), and with
    `fisher` a hook per weight; returns the hooks' handles for the caller to remove.
    Autograd sums the batches' gradients into .grad by itself (the first-order sum);
    a hook sees each batch's gradient once, for the Fisher diagonal."""
    wanted = {id(p) for per in watched.values() for p in per.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    handles: list[Any] = []
    if fisher:
        if geom is None:
            raise ValueError("the Fisher diagonal needs the layer geometry (`geom`)")
        specs = {s.name: s for s in arch.attention + arch.dense_mlp}
        for k, per in watched.items():
            stats[k].fisher = Accumulator(geom)
            for name, p in per.items():
                handles.append(p.register_hook(_fisher_into(stats[k], specs[name], p)))
    return handles


def _layer_checkpointing(model: Any, layers: Any, on: bool) -> None:
    """transformers checkpoints a decoder layer only when that module is in training
    mode; its children (dropout, attention) stay in eval mode."""
    _checkpointing(model, on)
    for layer in layers:
        layer.training = on


def _run_batches(
    model: Any,
    windows: Sequence[Sequence[int]],
    depth: DepthStats,
    states: dict[int, torch.Tensor],
    gradients: bool,
    batch_size: int,
    device: str,
    progress: bool,
) -> tuple[float, int, int]:
    """The pass itself, the hooks already in place: per batch one forward (and with
    `gradients` one backward); returns the summed loss (NaN when the LM head was
    skipped), the predicted tokens and the batches."""
    from tqdm import tqdm

    n = depth.layers
    loss_sum, tokens, batches = 0.0, 0, 0
    starts = range(0, len(windows), batch_size)
    for i in tqdm(starts, desc="calibrate", unit="batch", disable=not progress, leave=False):
        ids = torch.tensor([list(w) for w in windows[i : i + batch_size]], device=device)
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        if gradients:
            loss = lm_loss.next_token_loss(model, ids)
            loss_sum += float(loss.detach()) * predicted
        else:  # the statistics live before the LM head: skip it (a fifth of the work)
            with torch.no_grad():
                model.base_model(input_ids=ids, use_cache=False)
            loss_sum = math.nan
        depth.update([states[k] for k in range(n + 1)])
        tokens += predicted
        batches += 1
        if gradients:
            loss.backward()
            del loss
        states.clear()
    return loss_sum, tokens, batches


def watch_inputs(model: Any, arch: Architecture, stats: Sequence[LayerStats]) -> list[Any]:
    """Hooks that feed every layer's o_proj and dense down_proj inputs into its
    `LayerStats` (`attn_in`, `mlp_in`); a MoE layer has no dense down_proj, so only
    its attention is watched. The caller removes the handles."""

    def moments(target: InputMoments) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            target.update(args[0])

        return hook

    handles = []
    for k, layer_stats in enumerate(stats):
        for space, target in (("q", layer_stats.attn_in), ("ffn", layer_stats.mlp_in)):
            spec = output_projection(arch.attention + arch.dense_mlp, space)
            if spec is None:
                continue
            try:
                module = model.get_submodule(module_path(arch, k, spec))
            except AttributeError:
                continue  # a MoE layer has no dense down_proj
            handles.append(module.register_forward_pre_hook(moments(target)))
    return handles


def _checkpointing(model: Any, on: bool) -> None:
    """transformers 5.x calls it activation checkpointing; older releases, gradient."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _fisher_into(stats: LayerStats, spec: TensorSpec, weight: torch.Tensor) -> Any:
    def hook(grad: torch.Tensor) -> None:
        stats.add_fisher(spec, weight, grad)

    return hook


def watch_residual(layers: Any, states: dict[int, torch.Tensor]) -> list[Any]:
    """Hooks that put h[k] (the input of layer k) and h[L] (the last output) in `states`."""

    def before(k: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states[k] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def after(_module: Any, _args: Any, output: Any) -> None:
        states[len(layers)] = (output[0] if isinstance(output, tuple) else output).detach()

    handles = [
        layer.register_forward_pre_hook(before(k), with_kwargs=True)
        for k, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(after))
    return handles


def residual_states(model: Any, arch: Architecture, ids: torch.Tensor) -> list[torch.Tensor]:
    """h[0] .. h[L] of one batch: the input of every decoder layer, then the last output."""
    layers = model.get_submodule(arch.layers_module)
    states: dict[int, torch.Tensor] = {}
    handles = watch_residual(layers, states)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [states[k] for k in range(len(layers) + 1)]


def depth_stats(
    model: Any,
    arch: Architecture,
    windows: Sequence[Sequence[int]],
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> DepthStats:
    """Angular distance and block influence over `windows`, one forward per batch."""
    return collect(
        model, arch, windows, batch_size=batch_size, device=device, progress=progress
    ).depth
