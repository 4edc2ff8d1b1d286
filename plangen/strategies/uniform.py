"""Uniform width: the same cut in every layer of a range (LLM-Pruner, Wanda-sp).

`--ratio R` removes round(R * kv_heads) KV groups (`--round-groups down`:
int(R * kv_heads), LLM-Pruner's count) and round(R * ffn) channels
per layer; a parameter budget instead fixes the attention cut from the
overall fraction and lets the MLP take the exact remainder, so the result
lands within one channel per layer of the budget. Attention and MLP have
their own layer ranges (`--attn-layers`, `--mlp-layers`; `--parts mlp` and
`--parts attn` are the MLP-only and attention-only presets). A model with a
single KV group never gets an attention cut (that would remove attention).
"""

from __future__ import annotations

import warnings

from plangen.candidate import Candidate, lowest_groups
from plangen.strategies import Budget, StrategyError


def groups_to_drop(budget: Budget, layer: int, metric: str, n: int) -> tuple[int, ...]:
    return lowest_groups(budget.scores.width(metric, layer).groups, n)


def uniform(
    budget: Budget,
    metric: str,
    attn_layers: list[int],
    mlp_layers: list[int],
    ratio: float | None = None,
    compensate: bool = False,
    round_groups: str = "nearest",
) -> Candidate:
    """`round_groups="down"` counts KV groups as LLM-Pruner does, int(fraction * kv)."""
    rnd = int if round_groups == "down" else round
    kv, ffn = budget.kv_heads, budget.ffn
    attn_layers = [i for i in attn_layers if i in budget.layers]
    mlp_layers = [i for i in mlp_layers if i in budget.layers]
    if kv <= 1 and attn_layers:
        warnings.warn(
            "the model has a single KV group per layer: attention is left whole", stacklevel=2
        )
        attn_layers = []
    if not attn_layers and not mlp_layers:
        raise StrategyError("no layer is left to prune: check --parts, --attn-layers, --mlp-layers")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise StrategyError(f"--ratio must be between 0 and 1, got {ratio}")
        g = min(kv - 1, rnd(ratio * kv)) if attn_layers else 0
        c = round(ratio * ffn) if mlp_layers else 0
    else:
        span = len(set(attn_layers) | set(mlp_layers)) * budget.layer_cost
        fraction = budget.remove / span if span else 0.0
        g = min(kv - 1, rnd(fraction * kv)) if attn_layers else 0
        if not mlp_layers:
            g = min(kv - 1, rnd(budget.remove / (budget.group_cost * len(attn_layers))))
        rest = budget.remove - g * budget.group_cost * len(attn_layers)
        c = round(rest / (budget.channel_cost * len(mlp_layers))) if mlp_layers else 0
    c = max(0, min(ffn - 1, c))
    if g == 0 and c == 0:
        raise StrategyError("the cut rounds to nothing: raise --ratio or lower --target-params")
    groups = {i: groups_to_drop(budget, i, metric, g) for i in attn_layers} if g else {}
    widths = {i: ffn - c for i in mlp_layers} if c else {}
    label = (
        f"uniform {metric}: "
        + (f"{g} of {kv} KV groups in {len(groups)} layers" if groups else "attention whole")
        + ", "
        + (f"MLP {ffn - c} of {ffn} channels in {len(widths)} layers" if widths else "MLP whole")
        + (", compensated" if compensate else "")
    )
    return Candidate(
        "uniform",
        label,
        groups_dropped=groups,
        mlp_width=widths,
        metric=metric,
        compensate=compensate,
    )
