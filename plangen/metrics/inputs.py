"""What a width metric may read about one decoder layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.architectures import Architecture, TensorSpec
from compiler.geometry import Geometry
from plangen.calibrate import InputMoments, LayerStats, output_projection


@dataclass(frozen=True)
class LayerInputs:
    """One layer's weights (by layer-relative name), its calibration statistics, its shape
    and, for the gradient metrics, its gradients summed over the calibration batches."""

    index: int
    weights: Mapping[str, torch.Tensor]
    specs: tuple[TensorSpec, ...]  # the table's attention and dense-MLP tensors present
    stats: LayerStats
    geom: Geometry
    seed: int = 0  # for the random baseline
    grads: Mapping[str, torch.Tensor] = field(default_factory=dict)  # by layer-relative name

    @classmethod
    def of(
        cls,
        module: Any,
        arch: Architecture,
        index: int,
        stats: LayerStats,
        geom: Geometry,
        seed: int = 0,
        grads: Mapping[str, torch.Tensor] | None = None,
    ) -> LayerInputs:
        """Decoder layer `index` while the walk has it loaded (`module`): the weights of
        its attention and dense-MLP tensors (a MoE layer's: its attention only)."""
        own = dict(module.named_parameters())
        present = tuple(s for s in arch.attention + arch.dense_mlp if s.name in own)
        weights = {s.name: own[s.name].detach() for s in present}
        return cls(index, weights, present, stats, geom, seed, grads or {})

    def output_projections(self) -> list[tuple[TensorSpec, torch.Tensor, InputMoments]]:
        """(spec, float64 weight, input moments) of o_proj (q space) and down_proj (ffn)."""
        out = []
        for space, moments in (("q", self.stats.attn_in), ("ffn", self.stats.mlp_in)):
            spec = output_projection(self.specs, space)
            if spec is not None and spec.name in self.weights and moments.count:
                out.append((spec, self.weights[spec.name].double(), moments))
        return out
