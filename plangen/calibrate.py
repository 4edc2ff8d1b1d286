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
weights' gradients). The pass is the executor's layer walk
(`executor.layerwise.LayerWalk`): per layer, inside `walk.layer(i)`, hooks on
its output projections feed the input moments while it runs over every batch,
and the states entering and leaving it feed the depth statistics. The
in-memory path is the walk with every layer resident (`LayerWalk.over` the
loaded model); a walk opened on the checkpoint runs the same code with one
layer in memory at a time.

When a gradient metric is asked for, the walk keeps every layer boundary and
the reverse sweep (`LayerWalk.backward_sweep`) gives, bit for bit, the
gradients of a full model's per-batch backward: each batch's gradient folded
into the Fisher term per unit as it arrives, the sums over batches per weight.
Without gradients nothing of size layers x tokens x hidden is kept.

The width metrics asked for are scored in the same walk, while their layer is
in memory and its inputs are complete (`LayerStats.scores`): the forward-only
ones once the layer has run over every batch, the gradient ones in the sweep
once its gradients are summed over the batches. A layer's summed gradients are
dropped as soon as it is scored, so the pass never holds more than one layer's
worth of them (an 8B model's would be 32 GB of float32), and the sidecar's
tables need no weight after the walk (`scores.compute_tables`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from compiler.architectures import Architecture, TensorSpec
from compiler.geometry import Geometry
from executor import distributed, sharding
from executor.layerwise import LayerWalk, States
from plangen.metrics.depth import DepthStats
from plangen.metrics.inputs import InputMoments, LayerInputs, LayerStats, output_projection
from plangen.metrics.registry import WIDTH_METRICS
from plangen.metrics.units import Accumulator


@dataclass
class Calibration:
    """Everything one calibration pass measured."""

    depth: DepthStats
    layers: list[LayerStats]
    batches: int
    tokens: int
    loss: float  # mean next-token loss over the calibration windows (NaN: not measured)
    gradients: bool
    fused: bool = False  # the gradient pass ran batch by batch, no layer recomputed


class LayerObserver(Protocol):
    """Something else the forward walk should gather while each layer runs over every
    batch of the unpruned model's states (e.g. `plangen.reconstruct.SharedGrams`):
    `attach` its hooks to the loaded layer, `detach` them once the layer has seen
    every batch (also when the walk fails). The fused pass (`_fused`) attaches every
    layer before the first batch and detaches them all after the last."""

    def attach(self, i: int, module: Any) -> None: ...

    def detach(self, i: int) -> None: ...


def module_path(arch: Architecture, layer: int, spec: TensorSpec) -> str:
    return arch.layer_prefix.format(i=layer) + spec.name.removesuffix(".weight")


def collect(
    model: Any,
    arch: Architecture,
    windows: Sequence[Sequence[int]],
    *,
    metrics: Sequence[str] = (),
    scored: Collection[int] | None = None,
    seed: int = 0,
    gradients: bool = False,
    fisher: bool = False,
    geom: Geometry | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
    walk: LayerWalk | None = None,
    observers: Sequence[LayerObserver] = (),
    fused: bool | None = None,
    reserve: int = 0,
) -> Calibration:
    """One pass over `windows`: depth scores, projection-input moments and, with
    `gradients`, a reverse sweep for the gradient metrics and, with `fisher`, the
    Fisher term folded per unit. The width `metrics` (they and `fisher` need the layer
    `geom`; `seed` seeds the random baseline) are scored in the walk on the `scored`
    layers (default: all) into `LayerStats.scores`; no summed gradient is kept.

    The pass walks the decoder layer by layer: `walk` (e.g. `LayerWalk.open` on the
    checkpoint, the model never whole in memory; `model` is then unused), or the
    walk over the loaded `model` with every layer resident. The reverse sweep
    recomputes one layer at a time, so the gradient pass holds one layer's
    activations, as gradient checkpointing would; `fused` (default: on a resident
    walk in one process, as memory allows, `plangen.memory.fused_fits`) runs the
    forward walk and the sweep batch by batch instead (`LayerWalk.fused_sweep`: no
    layer recomputed, one batch's activations of every layer held), the same
    statistics bit for bit. `observers` gather more in the forward walk, on the
    same states; `reserve`: the bytes they will hold (the fused pass must fit
    beside them).

    Under torchrun each process walks its share of the batches, unless the walk
    shards the sweep's layers (`LayerWalk.shard_layers`, `executor.sharding`): then
    the gradient pass runs every batch on every process."""
    with _batches(walk, gradients):
        score = _Scoring(arch, tuple(metrics), scored, geom, seed)
        score.check(gradients)
        if walk is None:
            walk = LayerWalk.over(model, arch, device, batch_size)
        from tqdm import tqdm

        n = walk.num_layers
        split = distributed.current() is not None  # torchrun: this process's share of batches
        stats = [LayerStats() for _ in range(n)]
        depth = DepthStats(n, split=split)
        states = walk.inputs(windows)
        if fused is None:
            fused = gradients and walk.resident and not split and _fused_fits(walk, states, reserve)
        if fused and gradients:
            loss = _fused(walk, arch, states, stats, depth, observers, fisher, geom, score)
            return Calibration(depth, stats, *_counted(states), loss, gradients, fused=True)
        bounds = [states]
        for i in tqdm(range(n), desc="calibrate", unit="layer", disable=not progress, leave=False):
            with walk.layer(i) as module:
                for o in observers:
                    o.attach(i, module)
                try:
                    states = _forward_observed(
                        walk, i, states, module, arch, stats[i], depth, gradients
                    )
                finally:
                    for o in observers:
                        o.detach(i)
                if split:  # every process's batches, in global batch order
                    stats[i].attn_in.settle()
                    stats[i].mlp_in.settle()
                score(i, module, stats[i])
            if gradients:
                bounds.append(states)
        if split:
            depth.settle()
        batches, tokens = _counted(states)
        loss = math.nan
        if gradients:
            loss = _sweep(walk, arch, bounds, stats, fisher, geom, score)
        return Calibration(depth, stats, batches, tokens, loss, gradients)


def _batches(walk: LayerWalk | None, gradients: bool) -> Any:
    """Which batches this process walks: under torchrun its share (the current shard),
    or every batch when the walk shards the sweep's layers (`distributed.whole`)."""
    if gradients and walk is not None and walk.shard_layers:
        return distributed.whole()
    return contextlib.nullcontext()


def _counted(states: States) -> tuple[int, int]:
    """The batches and the tokens predicted, over every process's batches (a collective
    under torchrun)."""
    sizes: list[tuple[int, int]] = []  # (windows, tokens predicted) per batch
    distributed.replay([(b.ids.shape[0], b.ids.shape[1] - 1) for b in states.batches], sizes.append)
    return len(sizes), sum(rows * width for rows, width in sizes)


def _fused_fits(walk: LayerWalk, states: States, reserve: int) -> bool:
    from plangen.memory import fused_fits

    rows = max((b.ids.shape[0] for b in states.batches), default=0)
    seqlen = max((b.ids.shape[1] for b in states.batches), default=0)
    return fused_fits(walk, rows * seqlen, seqlen, reserve)


def _fused(
    walk: LayerWalk,
    arch: Architecture,
    states: States,
    stats: Sequence[LayerStats],
    depth: DepthStats,
    observers: Sequence[LayerObserver],
    fisher: bool,
    geom: Geometry | None,
    score: _Scoring,
) -> float:
    """The forward walk's statistics and the sweep's gradients in one pass, batch by
    batch (`LayerWalk.fused_sweep`): every layer's hooks and observers attached for
    the pass, each layer's forward-only metrics scored once every batch has passed
    it, its gradient metrics as the sweep's `on_layer` gives its sums. Each statistic
    sees the same batches in the same order as in the layer walk."""
    handles = []
    attached: list[int] = []
    try:
        for i, module in enumerate(walk.layers):
            handles += watch_layer_inputs(module, arch, stats[i])
            for o in observers:
                o.attach(i, module)
            attached.append(i)
        forward_done = False

        def scored_forward() -> None:
            nonlocal forward_done
            if not forward_done:  # every batch has passed every layer
                forward_done = True
                for h in handles:
                    h.remove()
                for i in attached:
                    for o in observers:
                        o.detach(i)
                attached.clear()
                for i, module in enumerate(walk.layers):
                    score(i, module, stats[i])

        return _sweep(
            walk, arch, [states], stats, fisher, geom, score,
            fused=(depth.update_layer, scored_forward),
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
        for i in attached:
            for o in observers:
                o.detach(i)


@dataclass(frozen=True)
class _Scoring:
    """The width metrics the walk scores, on which layers: each as soon as its layer's
    inputs are complete, so that no weight and no summed gradient is needed after."""

    arch: Architecture
    metrics: tuple[str, ...]
    layers: Collection[int] | None  # None: every layer
    geom: Geometry | None
    seed: int

    def check(self, gradients: bool) -> None:
        """Refuse, before any pass, what the walk could not score."""
        if self.metrics and self.geom is None:
            raise ValueError("the width metrics need the layer geometry (`geom`)")
        unmet = [m for m in self.metrics if WIDTH_METRICS[m].needs == "gradients"]
        if unmet and not gradients:
            raise ValueError(f"{', '.join(unmet)} need the gradient pass (`gradients=True`)")

    def __call__(
        self, i: int, module: Any, stats: LayerStats, grads: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Layer i's scores, into `stats.scores`: of the forward-only metrics (after its
        forward over every batch), or with `grads` (its gradients summed over the
        batches, in the sweep) of the gradient metrics."""
        swept = grads is not None
        now = [m for m in self.metrics if (WIDTH_METRICS[m].needs == "gradients") == swept]
        if not now or (self.layers is not None and i not in self.layers):
            return
        assert self.geom is not None
        layer = LayerInputs.of(module, self.arch, i, stats, self.geom, self.seed, grads)
        for name in now:
            stats.scores[name] = WIDTH_METRICS[name].score(layer)


def _forward_observed(
    walk: LayerWalk,
    i: int,
    states: States,
    module: Any,
    arch: Architecture,
    stats: LayerStats,
    depth: DepthStats,
    keep: bool,
) -> States:
    """Layer i over every batch with its input hooks in place; the depth statistics
    from the states entering and leaving it. The input boundary is kept with `keep`
    (the sweep needs it), else overwritten by the output."""
    handles = watch_layer_inputs(module, arch, stats)
    out = walk.new_cache() if keep else states.cache
    try:
        for k in range(len(states)):
            h_in = states.get(k, walk.device)
            h_out = walk.forward_batch(i, states, k, module)
            depth.update_layer(i, k, h_in, h_out)
            out.put(k, h_out)
            del h_in, h_out
    finally:
        for h in handles:
            h.remove()
    return States(states.batches, out, i + 1)


def _sweep(
    walk: LayerWalk,
    arch: Architecture,
    bounds: list[States],
    stats: Sequence[LayerStats],
    fisher: bool,
    geom: Geometry | None,
    score: _Scoring,
    fused: tuple[Callable[[int, int, torch.Tensor, torch.Tensor], None], Callable[[], None]]
    | None = None,
) -> float:
    """The reverse sweep over the kept boundaries: the gradients of the layers' own
    weights (not embeddings or norms), each batch's folded per unit with `fisher`,
    their sums over batches handed to `score` while the layer is loaded and dropped
    after (the walk clears `.grad`); returns the mean calibration loss. With `fused`
    (`on_forward`, and what runs once the forward has passed every batch: before the
    first `on_layer`), `bounds` is the inputs alone and the walk's `fused_sweep` runs
    the forward too."""
    specs = {s.name: s for s in arch.attention + arch.dense_mlp}
    if fisher:
        if geom is None:
            raise ValueError("the Fisher diagonal needs the layer geometry (`geom`)")
        for layer_stats in stats:
            layer_stats.fisher = Accumulator(geom)

    # Under torchrun each batch's folded Fisher terms wait for `on_layer`, which adds
    # every process's in global batch order (`distributed.replay`).
    split = distributed.current() is not None
    pending: list[list[list[tuple[str, torch.Tensor]]]] = []

    def on_batch(i: int, _k: int, module: Any, grads: dict[str, torch.Tensor]) -> None:
        if split:
            parts = [
                stats[i].fisher_parts(specs[n], sharding.full(module.get_parameter(n)), g)
                for n, g in grads.items()
            ]
            pending.append(parts)
            return
        for name, g in grads.items():  # a sharded layer's: each gathered when read
            stats[i].add_fisher(specs[name], sharding.full(module.get_parameter(name)), g)

    def on_layer(i: int, module: Any) -> None:
        if fused is not None:
            fused[1]()
        if fisher and split:
            accumulator = stats[i].fisher
            assert accumulator is not None
            mine = list(pending)
            pending.clear()
            distributed.replay(mine, lambda batch: [accumulator.add(p) for p in batch])
        summed = sharding.Gathered(
            {
                name: p.grad.detach()
                for name, p in module.named_parameters()
                if name in specs and p.grad is not None
            }
        )
        score(i, module, stats[i], summed)

    if fused is not None:
        return walk.fused_sweep(
            bounds[0],
            on_layer,
            on_forward=fused[0],
            on_batch=on_batch if fisher else None,
            wants=lambda _i, name: name in specs,
        )
    return walk.backward_sweep(
        bounds,
        on_layer,
        on_batch=on_batch if fisher else None,
        wants=lambda _i, name: name in specs,
    )


def watch_layer_inputs(layer: Any, arch: Architecture, stats: LayerStats) -> list[Any]:
    """Hooks that feed one decoder layer's o_proj and dense down_proj inputs into its
    `LayerStats` (`attn_in`, `mlp_in`); a MoE layer has no dense down_proj, so only
    its attention is watched. The caller removes the handles."""

    def moments(target: InputMoments) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            target.update(args[0])

        return hook

    handles = []
    for space, target in (("q", stats.attn_in), ("ffn", stats.mlp_in)):
        spec = output_projection(arch.attention + arch.dense_mlp, space)
        if spec is None:
            continue
        try:
            module = layer.get_submodule(spec.name.removesuffix(".weight"))
        except AttributeError:
            continue  # a MoE layer has no dense down_proj
        handles.append(module.register_forward_pre_hook(moments(target)))
    return handles


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
