"""`--plot`: one PNG of per-layer importance and what the plan keeps of each layer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from compiler.facts import ModelFacts
from plangen.candidate import Candidate
from plangen.scores import ScoreTables

PLOT_EXTRA = "pip install 'plancc[plot]'"


def plot_available() -> bool:
    """matplotlib (the `plot` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_plan(path: Path, facts: ModelFacts, scores: ScoreTables, cand: Candidate) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    n = facts.layers or 0
    kv, ffn = facts.kv_heads or 1, facts.ffn or 1
    layers = list(range(n))
    attn = [0.0 if i in cand.drop else 1 - len(cand.groups_dropped.get(i, ())) / kv for i in layers]
    mlp = [0.0 if i in cand.drop else cand.mlp_width.get(i, ffn) / ffn for i in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    bi = scores.layer_vector("block_influence")
    top.bar(layers, bi, color="tab:blue", label="block influence (ShortGPT)")
    if scores.has("removal"):
        top.plot(layers, scores.layer_vector("removal"), "k.-", label="removal loss")
    top.set_ylabel("layer importance")
    top.legend(loc="upper right")
    width = 0.4
    bottom.bar([i - width / 2 for i in layers], attn, width, label="attention kept")
    bottom.bar([i + width / 2 for i in layers], mlp, width, label="MLP kept")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("fraction kept")
    bottom.legend(loc="lower right")
    fig.suptitle(cand.label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
