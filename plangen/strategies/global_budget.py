"""Global: one budget over every KV group and MLP channel of the model.

Every unit of every dense layer is a knapsack item with a price (its
parameters, from the cost model) and a value (its score). Units are removed
from the least valuable up until the budget is met (seed 4's greedy
knapsack), so layers that matter keep more. Two rankings:

* `per-param` (default): value / price, the greedy knapsack order. Scores
  measured in loss units (`taylor`, `taylor2`) compare across layers as they
  are; other metrics are first divided by their layer's mean for that module.
* `score`: FLAP's adaptive structure search, scores compared as they are and
  the budget counted in parameters. Used with the `flap` metric (standardized
  per layer) and `compensate`, this is FLAP.

`max_layer_cut` bounds what any one layer may lose, `trust` the same as a
multiple of the average cut (a trust region: the scores are first-order, so a
layer cut deep is where they are least right; see TRUST_REGION).
A layer never loses its last KV group or channel, unless
`--remove-empty-layers`, which turns a layer left with neither into a drop
(and gives a layer left with only one of them its best unit back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plangen.candidate import Candidate
from plangen.strategies import Budget, StrategyError

LOSS_UNIT_METRICS = ("taylor", "taylor2", "taylor_vec", "flap")
# The default bound on one layer's cut, as a multiple of the average cut: the
# scores are first-order estimates, least right where a layer is cut deepest.
# Measured on SmolLM2 (builtin calibration; eval on builtin and on unseen
# license text, 24 windows): the unbounded knapsack cut layers 23-28 by half at
# -12.5% and scored 16.66 / 30.43; bounded at 1.25x, 16.76 / 28.41; at 1.5x,
# 16.77 / 28.98; at -25%, 24.36 / 53.94 unbounded, 24.09 / 54.52 at 1.25x.
TRUST_REGION = 1.25


@dataclass(frozen=True, order=True)
class Unit:
    rank: float
    layer: int
    kind: int  # 0 = KV group, 1 = MLP channel
    index: int


def _values(
    budget: Budget, metric: str, layer: int, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    s = budget.scores.width(metric, layer)
    groups, channels = (
        np.asarray(s.groups, dtype=np.float64),
        np.asarray(s.channels, dtype=np.float64),
    )
    if normalize:
        groups = groups / (groups.mean() or 1.0)
        channels = channels / (channels.mean() or 1.0)
    return groups, channels


def _ranked_units(
    budget: Budget, metric: str, layers: list[int], rank: str, attention: bool
) -> list[Unit]:
    """Every removable unit, least valuable first: the knapsack's order of removal."""
    normalize = rank == "per-param" and metric not in LOSS_UNIT_METRICS
    per = rank == "per-param"
    units: list[Unit] = []
    for i in layers:
        groups, channels = _values(budget, metric, i, normalize)
        if attention:
            units += [
                Unit(float(v) / (budget.group_cost if per else 1.0), i, 0, g)
                for g, v in enumerate(groups)
            ]
        units += [
            Unit(float(v) / (budget.channel_cost if per else 1.0), i, 1, c)
            for c, v in enumerate(channels)
        ]
    units.sort()
    return units


def _trust_bound(budget: Budget, layers: list[int], trust: float) -> float:
    """`trust` times the average cut, which is that of the MLP taking the whole budget:
    so a bound of trust >= 1 times it can always be met, whatever attention gives."""
    average = budget.remove / (len(layers) * budget.ffn * budget.channel_cost)
    return min(1.0, trust * average)


def _remove_greedily(
    budget: Budget,
    units: list[Unit],
    left: dict[tuple[int, int], int],
    max_layer_cut: float | None,
    remove_empty_layers: bool,
) -> set[tuple[int, int, int]]:
    """The knapsack itself: units go cheapest-value first until the budget is met,
    skipping those a layer must keep; `left` is counted down in place."""
    kv, ffn = budget.kv_heads, budget.ffn
    removed: set[tuple[int, int, int]] = set()
    cut = max_layer_cut if max_layer_cut is not None else 1.0
    floor = (kv - int(cut * kv), ffn - int(cut * ffn))  # units a layer keeps at least
    spent = 0
    price = (budget.group_cost, budget.channel_cost)
    for u in units:
        if spent >= budget.remove:
            break
        if left[(u.layer, u.kind)] <= 1 and not remove_empty_layers:
            continue
        if max_layer_cut is not None and left[(u.layer, u.kind)] <= floor[u.kind]:
            continue
        removed.add((u.layer, u.kind, u.index))
        left[(u.layer, u.kind)] -= 1
        spent += price[u.kind]
    if spent < budget.remove - max(price):
        raise StrategyError(
            f"the global budget cannot reach the target: at most {spent:,} of {budget.remove:,} "
            "parameters can go without emptying a layer (try --remove-empty-layers or depth)"
        )
    return removed


def _emptied_layers(
    layers: list[int],
    units: list[Unit],
    left: dict[tuple[int, int], int],
    removed: set[tuple[int, int, int]],
    attention: bool,
) -> list[int]:
    """`--remove-empty-layers`: a layer left with nothing is dropped whole; a layer left
    with one part only would be a broken layer, so its emptied part gets its best unit
    back (`removed` and `left` are updated in place)."""
    drop = []
    for i in layers:
        empty_attn = attention and left[(i, 0)] == 0
        empty_mlp = left[(i, 1)] == 0
        if (empty_attn or not attention) and empty_mlp:
            drop.append(i)
            continue
        for kind, empty in ((0, empty_attn), (1, empty_mlp)):
            if empty:  # the best unit of an emptied part comes back
                best = max(u for u in units if u.layer == i and u.kind == kind)
                removed.discard((i, kind, best.index))
                left[(i, kind)] = 1
    return drop


def global_budget(
    budget: Budget,
    metric: str,
    layers: list[int] | None = None,
    rank: str = "per-param",
    attention: bool = True,
    compensate: bool = False,
    remove_empty_layers: bool = False,
    max_layer_cut: float | None = None,
    trust: float | None = None,
) -> Candidate:
    """`max_layer_cut`: no layer loses more than this fraction of its groups or channels;
    `trust`: the same bound as a multiple of the model-wide average cut (TRUST_REGION)."""
    kv, ffn = budget.kv_heads, budget.ffn
    layers = [i for i in (layers if layers is not None else budget.layers) if i in budget.layers]
    attention = attention and kv > 1
    units = _ranked_units(budget, metric, layers, rank, attention)
    left = {(i, 0): (kv if attention else 0) for i in layers} | {(i, 1): ffn for i in layers}
    if trust is not None and max_layer_cut is None and layers:
        max_layer_cut = _trust_bound(budget, layers, trust)
    removed = _remove_greedily(budget, units, left, max_layer_cut, remove_empty_layers)
    drop = _emptied_layers(layers, units, left, removed, attention) if remove_empty_layers else []
    groups = {
        i: tuple(sorted(g for (j, k, g) in removed if j == i and k == 0))
        for i in layers
        if i not in drop
    }
    groups = {i: g for i, g in groups.items() if g}
    widths = {i: left[(i, 1)] for i in layers if i not in drop and left[(i, 1)] < ffn}
    if metric == "flap" and rank == "score":
        form = "FLAP adaptive structure"
    else:
        form = f"global {metric} ({'attention and MLP' if attention else 'MLP only'})"
    label = (
        f"{form}: {sum(len(g) for g in groups.values())} KV groups and "
        f"{sum(ffn - w for w in widths.values())} channels over {len(layers)} layers"
        + (f", {len(drop)} emptied layers dropped" if drop else "")
        + (f", at most {max_layer_cut:.0%} per layer" if max_layer_cut is not None else "")
        + (", compensated" if compensate else "")
    )
    return Candidate(
        "flap" if form.startswith("FLAP") else "global",
        label,
        drop=tuple(drop),
        groups_dropped=groups,
        mlp_width=widths,
        metric=metric,
        compensate=compensate,
    )
