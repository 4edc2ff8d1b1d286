"""Random scores: the baseline every other metric must beat.

Seeded per (seed, layer) with numpy's PCG64, so a plan is reproducible and
changing one layer's decision never reshuffles another's.
"""

from __future__ import annotations

import numpy as np

from plangen.metrics import LayerScores
from plangen.metrics.inputs import LayerInputs


def random_scores(layer: LayerInputs) -> LayerScores:
    rng = np.random.default_rng([layer.seed, layer.index])
    return LayerScores(rng.random(layer.geom.kv_heads), rng.random(layer.geom.ffn))
