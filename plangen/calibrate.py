"""Calibration: one pass over the calibration windows, statistics collected by hooks.

The windows come from `compiler.corpus` (calibration pool only, consecutive
`seqlen` windows from its start), so calibration and `plancc eval` share one
protocol and never overlap. The decoder layers are found through the
architecture table's `layers_module`; a pre-hook on each layer records the
hidden state entering it and a hook on the last one the state leaving it
(before the final norm), which is what the depth scores read. Statistics are
fed to accumulators batch by batch, in layer order, so nothing of size
layers × tokens × hidden is ever kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from compiler.architectures import Architecture
from plangen.metrics.depth import DepthStats


def residual_states(model: Any, arch: Architecture, ids: torch.Tensor) -> list[torch.Tensor]:
    """h[0] .. h[L] of one batch: the input of every decoder layer, then the last output."""
    layers = model.get_submodule(arch.layers_module)
    states: dict[int, torch.Tensor] = {}

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
    from tqdm import tqdm

    layers = len(model.get_submodule(arch.layers_module))
    stats = DepthStats(layers)
    starts = range(0, len(windows), batch_size)
    for i in tqdm(starts, desc="calibrate", unit="batch", disable=not progress, leave=False):
        ids = torch.tensor([list(w) for w in windows[i : i + batch_size]], device=device)
        stats.update(residual_states(model, arch, ids))
    return stats
