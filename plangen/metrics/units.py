"""Prunable units of a dense decoder layer and how element scores fold onto them.

A plan removes whole KV groups (a KV head, the query heads that read it, their
o_proj columns) and whole MLP channels (a gate row, an up row, a down column),
so every importance score, whatever it measures per weight, ends as one number
per group and one per channel. The layout of each tensor axis comes from the
architecture table's spaces and the executor's `space_indices` (the one
definition of which positions a group or channel owns), so a score always
covers exactly what apply would cut.
"""

from __future__ import annotations

import numpy as np
import torch

from compiler.architectures import TensorSpec
from compiler.geometry import FFN_PARTS, Geometry, LayerSelection, space_indices
from plangen.metrics import LayerScores

GROUP_SPACES = ("q", "kv", "qkv")


def group_positions(space: str, geom: Geometry) -> list[np.ndarray]:
    """The positions along a `space` axis that each KV group owns, group by group."""
    return [space_indices(space, LayerSelection(groups=(g,)), geom) for g in range(geom.kv_heads)]


def fold(vec: torch.Tensor, space: str, geom: Geometry) -> tuple[str, torch.Tensor]:
    """Per-position sums along a `space` axis → ("groups", (kv,)) or ("channels", (ffn,))."""
    vec = vec.double()
    if space in GROUP_SPACES:
        parts = [vec[torch.from_numpy(ix)].sum() for ix in group_positions(space, geom)]
        return "groups", torch.stack(parts)
    if space in FFN_PARTS:
        return "channels", vec.reshape(FFN_PARTS[space], geom.ffn).sum(0)
    raise ValueError(f"space {space!r} holds neither KV groups nor MLP channels")


def fold_elements(
    score: torch.Tensor, spec: TensorSpec, geom: Geometry
) -> list[tuple[str, torch.Tensor]]:
    """An element-wise score of one tensor, summed onto the units its axes belong to."""
    out = []
    for axis, space in enumerate(spec.dims):
        if space in GROUP_SPACES or space in FFN_PARTS:
            others = [a for a in range(score.dim()) if a != axis]
            # Reduced with float64 accumulation, never a float64 copy of the tensor.
            vec = score.sum(dim=others, dtype=torch.float64) if others else score.double()
            out.append(fold(vec, space, geom))
    return out


class Accumulator:
    """Sums folded contributions of several tensors into one layer's unit scores."""

    def __init__(self, geom: Geometry) -> None:
        self.geom = geom
        self.groups = torch.zeros(geom.kv_heads, dtype=torch.float64)
        self.channels = torch.zeros(geom.ffn, dtype=torch.float64)

    def add(self, parts: list[tuple[str, torch.Tensor]]) -> None:
        for kind, vec in parts:
            if kind == "groups":
                self.groups += vec
            else:
                self.channels += vec

    def result(self) -> LayerScores:
        return LayerScores(self.groups.numpy().copy(), self.channels.numpy().copy())
