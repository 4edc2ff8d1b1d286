"""Unbalanced width: per-layer cuts from a layer-importance score.

Each layer's share of the removed parameters follows its importance
(`--importance block_influence|angular|removal`): `--allocation inverse` gives
a layer a share proportional to 1 / importance (the least important lose the
most), `uniform` equal shares. `--distribution A:M` splits each share between
attention and MLP; `--freeze-top N` leaves the N most important layers
whole. A layer's cut is capped (it keeps at least one KV group and one eighth
of its channels); what a cap or rounding leaves over moves to the next-least
important layers, so the result lands within one channel of the budget.
"""

from __future__ import annotations

from plangen.candidate import Candidate
from plangen.strategies import Budget, StrategyError
from plangen.strategies.uniform import groups_to_drop

MIN_CHANNEL_FRACTION = 1 / 8


def layer_importance(budget: Budget, score: str) -> dict[int, float]:
    scores = budget.scores
    if score == "angular":
        dist = scores.angular()
        n = budget.facts.layers or 0
        return {i: dist[(i, 1)] for i in range(n)}
    if not scores.has(score):
        raise StrategyError(f"the scores have no `{score}` table (measure it with --metric)")
    return dict(enumerate(scores.layer_vector(score)))


def parse_distribution(text: str) -> float:
    """`A:M` → the attention fraction A / (A + M)."""
    try:
        a, m = (float(x) for x in text.split(":"))
        assert a >= 0 and m >= 0 and a + m > 0
    except (ValueError, AssertionError):
        raise StrategyError(
            f"--distribution must look like 2:8 (attention:MLP), got {text!r}"
        ) from None
    return a / (a + m)


def unbalanced(
    budget: Budget,
    metric: str,
    importance: str = "block_influence",
    allocation: str = "inverse",
    attn_fraction: float = 0.0,
    freeze_top: int = 0,
    compensate: bool = False,
) -> Candidate:
    kv, ffn = budget.kv_heads, budget.ffn
    imp = layer_importance(budget, importance)
    layers = sorted(budget.layers, key=lambda i: (-imp[i], i))[freeze_top:]
    if not layers:
        raise StrategyError(f"--freeze-top {freeze_top} leaves no layer to prune")
    if kv <= 1:
        attn_fraction = 0.0
    floor = 1e-6
    weight = {i: (1.0 / max(imp[i], floor) if allocation == "inverse" else 1.0) for i in layers}
    total_weight = sum(weight.values())
    attn_budget = budget.remove * attn_fraction
    groups: dict[int, tuple[int, ...]] = {}
    spent = 0
    if attn_budget:
        for i in layers:
            want = attn_budget * weight[i] / total_weight
            g = min(kv - 1, round(want / budget.group_cost))
            if g:
                groups[i] = groups_to_drop(budget, i, metric, g)
                spent += g * budget.group_cost
    max_cut = ffn - max(1, round(ffn * MIN_CHANNEL_FRACTION))
    cuts = {i: 0 for i in layers}
    remaining = budget.remove - spent
    # Water-filling: shares by weight, capped, the excess re-shared among the rest.
    active = list(layers)
    while remaining >= budget.channel_cost and active:
        w = sum(weight[i] for i in active)
        for i in active:
            cuts[i] += remaining * weight[i] / w / budget.channel_cost
        over = [i for i in active if cuts[i] >= max_cut]
        for i in over:
            cuts[i] = max_cut
        active = [i for i in active if i not in over]
        remaining = budget.remove - spent - sum(cuts.values()) * budget.channel_cost
        if not over:
            break
    whole = {i: int(c) for i, c in cuts.items()}
    # Rounding: give the leftover channels to the least important uncapped layers.
    left = round((budget.remove - spent) / budget.channel_cost) - sum(whole.values())
    order = sorted(layers, key=lambda i: (imp[i], i))
    while left > 0 and any(whole[i] < max_cut for i in order):
        for i in order:
            if left and whole[i] < max_cut:
                whole[i] += 1
                left -= 1
    widths = {i: ffn - c for i, c in whole.items() if c}
    label = (
        f"unbalanced {metric} by {allocation} {importance}: "
        f"{sum(len(g) for g in groups.values())} KV groups and "
        f"{sum(whole.values())} channels"
        + (f", top {freeze_top} layers frozen" if freeze_top else "")
        + (", compensated" if compensate else "")
    )
    return Candidate(
        "unbalanced",
        label,
        groups_dropped=groups,
        mlp_width=widths,
        metric=metric,
        compensate=compensate,
    )
