"""Importance scores, one module per family, and the registry the CLI offers.

Depth scores (`depth`: angular distance, block influence; `removal`: the loss
with a layer bypassed) rank layers; width scores rank a layer's KV groups and
MLP channels (`magnitude`, `activation`: Wanda, fluctuation, FLAP; `taylor`:
first and second order; `baseline`: random). Every width metric maps one
layer's `LayerInputs` to `LayerScores`; `needs` says which calibration
statistics it reads, so the pass collects only those (gradients cost a
backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WIDTH_METRIC_NAMES = (
    "magnitude",
    "wanda",
    "fluctuation",
    "flap",
    "taylor",
    "taylor_vec",
    "taylor2",
    "random",
)
DEPTH_METRIC_NAMES = ("block_influence", "angular", "removal")
# Not measured in calibration: MLP channels ranked by Optimal Brain Surgeon inside the
# reconstruction walk (`plangen.reconstruct.obs_ranking`), on the pruned model so far.
OBS = "obs"
# The reconstruction walk's damping toward the kept weights, as a fraction of the mean
# diagonal of the kept inputs' Gram matrix (benchmarks/planner_peers.py measures it).
DAMP = 1e-3


@dataclass(frozen=True)
class LayerScores:
    """One layer's width scores: one per KV group, one per MLP channel (higher = keep)."""

    groups: np.ndarray  # (kv_heads,)
    channels: np.ndarray  # (ffn,)
