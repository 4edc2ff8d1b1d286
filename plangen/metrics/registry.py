"""The width metrics by name: what each reads and how it scores a layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from plangen.metrics import WIDTH_METRIC_NAMES, LayerScores
from plangen.metrics.activation import flap, fluctuation, wanda
from plangen.metrics.baseline import random_scores
from plangen.metrics.inputs import LayerInputs
from plangen.metrics.magnitude import magnitude
from plangen.metrics.taylor import taylor, taylor2, taylor_vec


@dataclass(frozen=True)
class WidthMetric:
    name: str
    needs: str  # "weights", "activations" or "gradients"
    score: Callable[[LayerInputs], LayerScores]
    summary: str


WIDTH_METRICS: dict[str, WidthMetric] = {
    m.name: m
    for m in (
        WidthMetric("magnitude", "weights", magnitude, "L2 norm of the unit's weights"),
        WidthMetric("wanda", "activations", wanda, "Wanda-sp: sum |W_ij| * ||X_j||"),
        WidthMetric(
            "fluctuation", "activations", fluctuation, "FLAP WIFV: Var(X_j) * ||W[:, j]||^2"
        ),
        WidthMetric("flap", "activations", flap, "fluctuation standardized per layer (FLAP)"),
        WidthMetric("taylor", "gradients", taylor, "first-order Taylor, sum |w*g| (param_first)"),
        WidthMetric(
            "taylor_vec", "gradients", taylor_vec, "first-order Taylor, |sum w*g| (vectorize)"
        ),
        WidthMetric("taylor2", "gradients", taylor2, "second order: 1/2 w^2 * Fisher diagonal"),
        WidthMetric("random", "weights", random_scores, "uniform random (seeded baseline)"),
    )
}
assert tuple(WIDTH_METRICS) == WIDTH_METRIC_NAMES
