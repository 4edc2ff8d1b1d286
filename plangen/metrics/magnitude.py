"""Weight magnitude: the L2 norm of every weight a unit owns (no calibration data).

Channel c scores sqrt(sum of squares of gate/up row c and down column c, and
biases), exactly the executor's `by magnitude` (`executor.slicing`,
`compiler.geometry`), so a plan
scored here and applied `by magnitude` picks the same channels; a KV group
scores the norm of its q/k/v rows and o_proj columns. Torch-Pruning's
magnitude criterion; kept as the weights-only baseline (the issue's
measurements show it ranks SmolLM2's MLP channels worse than random).
"""

from __future__ import annotations

import torch

from plangen.metrics import LayerScores
from plangen.metrics.inputs import LayerInputs
from plangen.metrics.units import Accumulator, fold_elements


def magnitude(layer: LayerInputs) -> LayerScores:
    acc = Accumulator(layer.geom)
    for spec in layer.specs:
        w = layer.weights.get(spec.name)
        if w is not None:
            acc.add(fold_elements(w.double() ** 2, spec, layer.geom))
    return LayerScores(
        torch.sqrt(acc.groups).numpy().copy(), torch.sqrt(acc.channels).numpy().copy()
    )
