"""Depth: drop whole decoder layers.

* `block_influence` (ShortGPT, Men et al. 2024): the n layers whose output is
  most like their input, chosen one by one (not necessarily adjacent);
* `angular` (Gromov et al. 2024): the contiguous block of n layers whose first
  input and last output are closest in angle;
* `removal`: the n layers whose bypass costs the least held-out loss.

The last layer is kept by default (`--no-keep-last-layer` lifts that): every
peer measurement shows dropping it hurts most. The number of layers comes from
`--drop N`, `--drop-frac F` (of the layers) or the parameter budget (the
count whose removal lands closest to it).
"""

from __future__ import annotations

from plangen.candidate import Candidate
from plangen.strategies import Budget, StrategyError

DEPTH_SCORES = ("block_influence", "angular", "removal")


def layers_for_budget(budget: Budget) -> int:
    return max(1, round(budget.remove / budget.layer_cost))


def depth(
    budget: Budget,
    n: int,
    score: str = "block_influence",
    keep_last: bool = True,
    split: float | None = None,
) -> Candidate:
    total = budget.facts.layers or 0
    candidates = list(range(total - 1 if keep_last else total))
    if not 0 < n <= len(candidates) - (0 if keep_last else 1):
        raise StrategyError(f"cannot drop {n} of {total} layers (keep-last-layer: {keep_last})")
    if score == "angular":
        dist = budget.scores.angular()
        starts = list(range(total - n + (0 if keep_last else 1)))
        start = min(starts, key=lambda s: (dist[(s, n)], s))
        drop = tuple(range(start, start + n))
        note = f"angular distance {dist[(start, n)]:.4f} for n={n} (best of {len(starts)} starts)"
    else:
        if not budget.scores.has(score):
            raise StrategyError(f"the scores have no `{score}` table (measure it with --metric)")
        values = budget.scores.layer_vector(score)
        ranked = sorted(candidates, key=lambda i: (values[i], i))
        drop = tuple(sorted(ranked[:n]))
        shown = "  ".join(f"L{i} {values[i]:.4f}" for i in drop)
        note = f"lowest {score}: {shown}"
    bundles = {}
    if split is not None:
        cut = min(len(drop), max(0, round(len(drop) * split)))
        bundles = {"B": drop[:cut], "C": drop[cut:]}
        bundles = {k: v for k, v in bundles.items() if v}
    label = f"depth: drop {n} layers by {score}"
    keep = (total - 1,) if keep_last else ()
    return Candidate(
        "depth", label, drop=drop, metric=score, notes={"drop": note}, bundles=bundles, keep=keep
    )
