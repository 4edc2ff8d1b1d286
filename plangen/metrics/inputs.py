"""What a width metric may read about one decoder layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from compiler.architectures import TensorSpec
from compiler.geometry import Geometry
from plangen.calibrate import InputMoments, LayerStats, output_projection


@dataclass(frozen=True)
class LayerInputs:
    """One layer's weights (by layer-relative name), its calibration statistics, its shape."""

    index: int
    weights: Mapping[str, torch.Tensor]
    specs: tuple[TensorSpec, ...]  # the table's attention and dense-MLP tensors present
    stats: LayerStats
    geom: Geometry
    seed: int = 0  # for the random baseline

    def output_projections(self) -> list[tuple[TensorSpec, torch.Tensor, InputMoments]]:
        """(spec, float64 weight, input moments) of o_proj (q space) and down_proj (ffn)."""
        out = []
        for space, moments in (("q", self.stats.attn_in), ("ffn", self.stats.mlp_in)):
            spec = output_projection(self.specs, space)
            if spec is not None and spec.name in self.weights and moments.count:
                out.append((spec, self.weights[spec.name].double(), moments))
        return out
