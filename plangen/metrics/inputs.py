"""What a width metric may read about one decoder layer: the calibration statistics
`plangen.calibrate` gathers in its walk (`LayerStats`), the layer's weights and,
in the reverse sweep, its summed gradients (`LayerInputs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.architectures import Architecture, TensorSpec
from compiler.geometry import Geometry
from executor import distributed
from executor.sharding import Gathered
from plangen.metrics import LayerScores
from plangen.metrics.units import Accumulator, fold_elements


@dataclass
class InputMoments:
    """Running float64 sums of an input's columns: count, sum and sum of squares."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    # Under torchrun, this process's batches' (sum, squares, rows), added by `settle`
    # with every process's in global batch order (a float sum depends on its order).
    pending: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        # One batch is summed in its own dtype (float32: a few thousand rows lose
        # nothing that matters), batches are accumulated in float64.
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows if rows.dtype == torch.float64 else rows.float()
        part = rows.sum(0).double().cpu(), (rows * rows).sum(0).double().cpu(), rows.shape[0]
        if distributed.running_batch() is not None:
            self.pending.append(part)
        else:
            self._add(part)

    def _add(self, part: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        s, q, rows = part
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += rows

    def settle(self) -> None:
        """Every process's pending batches added in global batch order (a collective
        under torchrun: every process calls it once its share has run)."""
        pending, self.pending = self.pending, []
        distributed.replay(pending, self._add)

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
    """What one decoder layer's metrics read of the pass (its projections' inputs, the
    Fisher term) and its width scores, measured in the walk. Its summed gradients are
    not kept: the sweep hands them to the gradient metrics while the layer is loaded."""

    attn_in: InputMoments = field(default_factory=InputMoments)  # o_proj input (q space)
    mlp_in: InputMoments = field(default_factory=InputMoments)  # down_proj input (ffn space)
    # The Fisher term 1/2 * w^2 * g_b^2, summed over batches and folded onto the
    # layer's KV groups and channels as each batch's gradient arrives: one number
    # per unit instead of a second copy of every weight (what lets an 8B model's
    # gradient pass fit one 80 GB card).
    fisher: Accumulator | None = None
    scores: dict[str, LayerScores] = field(default_factory=dict)  # by width metric

    def add_fisher(self, spec: TensorSpec, weight: torch.Tensor, grad: torch.Tensor) -> None:
        self.fisher.add(self.fisher_parts(spec, weight, grad))

    def fisher_parts(
        self, spec: TensorSpec, weight: torch.Tensor, grad: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """One batch's Fisher term of one weight, folded per unit (what `add_fisher` adds)."""
        assert self.fisher is not None
        wg = weight.detach().float() * grad.detach().float()
        return fold_elements(0.5 * wg * wg, spec, self.fisher.geom)


def output_projection(specs: Sequence[TensorSpec], space: str) -> TensorSpec | None:
    """The weight whose input axis is `space` (o_proj for q, down_proj for ffn)."""
    return next((s for s in specs if s.dims == ("hidden", space)), None)


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
        its attention and dense-MLP tensors (a MoE layer's: its attention only); a
        layer sharded for the sweep (`executor.sharding`) gives each gathered when read."""
        own = dict(module.named_parameters())
        present = tuple(s for s in arch.attention + arch.dense_mlp if s.name in own)
        weights = Gathered({s.name: own[s.name].detach() for s in present})
        return cls(index, weights, present, stats, geom, seed, grads or {})

    def output_projections(self) -> list[tuple[TensorSpec, torch.Tensor, InputMoments]]:
        """(spec, float64 weight, input moments) of o_proj (q space) and down_proj (ffn)."""
        out = []
        for space, moments in (("q", self.stats.attn_in), ("ffn", self.stats.mlp_in)):
            spec = output_projection(self.specs, space)
            if spec is not None and spec.name in self.weights and moments.count:
                out.append((spec, self.weights[spec.name].double(), moments))
        return out
