"""Activation-aware scores of the output projections' input columns: Wanda, FLAP.

Both read one calibration statistic per input column j of o_proj and down_proj
(`inputs.InputMoments`) and that column of the weight, W[:, j]; a unit's
score folds its columns (a KV group's heads, an MLP channel's one column).

* Wanda-sp (Sun et al.; structured form from An et al.): sum_i |W_ij| * ||X_j||,
  with ||X_j|| taken as sqrt(E[x_j^2]) (a per-layer constant factor of the
  token count changes no ranking).
* Fluctuation (FLAP, An et al. 2024, "WIFV"): Var(X_j) * sum_i W_ij^2, how much
  the output moves when column j is replaced by its mean, which is exactly what
  `compensate` then adds back as a bias.
* `flap`: FLAP's adaptive-structure score. The fluctuation, squared for
  attention columns as FLAP does, standardized over each layer's columns
  ((x - mean) / std, per module), then averaged over a group's columns; these
  are comparable across layers and modules, which FLAP's global search needs.
"""

from __future__ import annotations

import torch

from plangen.metrics import LayerScores
from plangen.metrics.inputs import LayerInputs
from plangen.metrics.units import Accumulator, fold, group_positions


def wanda(layer: LayerInputs) -> LayerScores:
    acc = Accumulator(layer.geom)
    for spec, w, moments in layer.output_projections():
        column = (w.abs() * moments.mean_square.sqrt()[None, :]).sum(0)
        acc.add([fold(column, spec.dims[1], layer.geom)])
    return acc.result()


def _fluctuation_columns(w: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    return variance * (w * w).sum(0)


def fluctuation(layer: LayerInputs) -> LayerScores:
    acc = Accumulator(layer.geom)
    for spec, w, moments in layer.output_projections():
        acc.add([fold(_fluctuation_columns(w, moments.variance), spec.dims[1], layer.geom)])
    return acc.result()


def _standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if float(std) > 0 else 1.0)


def flap(layer: LayerInputs) -> LayerScores:
    acc = Accumulator(layer.geom)
    for spec, w, moments in layer.output_projections():
        space = spec.dims[1]
        column = _fluctuation_columns(w, moments.variance)
        if space == "q":
            z = _standardize(column**2)
            acc.groups += torch.stack(
                [z[torch.from_numpy(ix)].mean() for ix in group_positions(space, layer.geom)]
            )
        else:
            acc.add([fold(_standardize(column), space, layer.geom)])
    return acc.result()
