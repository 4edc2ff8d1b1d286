"""Experts: the same number of routed experts dropped in every MoE layer.

Each layer keeps its best experts by one score table `METRIC.L.experts`
(higher = keep; `plangen.metrics.router`), never fewer than `top_k`. With
`rescale` the plan also asks the executor to scale the kept experts for the
router probability the dropped ones took (what routing renormalized over fewer
experts gives the survivors on average). Allocation across layers by measured
loss was tried and left out: on the trained Qwen2-MoE fixture it won at 25%
and lost at 50% (held-out probes of 2,048 tokens are too noisy to rank layers).
"""

from __future__ import annotations

import numpy as np

from compiler.facts import ModelFacts
from compiler.sidecar import table_name
from plangen.candidate import Candidate
from plangen.strategies import StrategyError

# What `--drop-experts` means when no size is given for a MoE model.
DEFAULT_DROP_EXPERTS = 0.25


def experts_to_drop(facts: ModelFacts, fraction: float) -> int:
    """Experts each MoE layer loses for `--drop-experts fraction` (never below top_k)."""
    n, top_k = facts.experts or 0, facts.top_k or 1
    if not 0.0 < fraction < 1.0:
        raise StrategyError(f"--drop-experts must be between 0 and 1, got {fraction}")
    groups = facts.expert_groups or 1
    k = round(fraction * n / groups) * groups  # group-limited routing: as many per group
    if k < 1:
        raise StrategyError(
            f"--drop-experts {fraction} of {n} experts rounds to none: drop at least "
            f"{groups / n:.3g}"
            + (f" (the same number from each of {groups} groups)" if groups > 1 else "")
        )
    if n - k < top_k:
        raise StrategyError(
            f"--drop-experts {fraction} leaves {n - k} of {n} experts, fewer than top_k {top_k}: "
            f"at most {(n - top_k) / n:.3g}"
        )
    return k


def keep_experts(
    facts: ModelFacts,
    tables: dict[str, np.ndarray],
    metric: str,
    drop: int,
    rescale: bool = False,
) -> Candidate:
    """Drop the `drop` lowest-scoring experts of every MoE layer (ties: the higher index
    goes first, as with KV groups); with group-limited routing (`expert_groups`), the
    same number from each group, which the router needs (P112)."""
    moe_layers = [i for i in range(facts.layers or 0) if facts.is_moe_layer(i)]
    groups = facts.expert_groups or 1
    dropped = {}
    for i in moe_layers:
        name = table_name(metric, i, "experts")
        if name not in tables:
            raise StrategyError(f"no `{metric}` expert scores for layer {i} (table {name})")
        score = np.asarray(tables[name], dtype=np.float64)
        size = len(score) // groups
        gone: list[int] = []
        for g in range(groups):
            block = score[g * size : (g + 1) * size]
            order = np.argsort(-block, kind="stable")
            gone += [g * size + int(e) for e in order[size - drop // groups :]]
        dropped[i] = tuple(sorted(gone))
    label = f"experts: {drop} of {facts.experts} dropped per MoE layer by {metric}" + (
        ", rescaled" if rescale else ""
    )
    return Candidate(
        "experts",
        label,
        metric=metric,
        experts_dropped=dropped,
        experts_rescale=rescale,
    )


def shrink_experts(
    facts: ModelFacts, metric: str, fraction: float, shared: bool, experts: bool = True
) -> Candidate:
    """Remove `fraction` of every routed expert's channels (and, `shared`, of the shared
    expert's) in every MoE layer, each expert keeping its own best ones by `metric`
    (sidecar `METRIC.L.experts_ffn`, `METRIC.L.shared`). Widths are rounded to a
    multiple of 8 when that leaves at least 8."""
    if not 0.0 < fraction < 1.0:
        raise StrategyError(f"--shrink-experts must be between 0 and 1, got {fraction}")

    def width(n: int) -> int:
        keep = (1.0 - fraction) * n
        rounded = int(round(keep / 8) * 8)
        return max(1, rounded if rounded >= 8 else round(keep))

    ew = width(facts.expert_ffn or 0) if experts and facts.expert_ffn else None
    sw = width(facts.shared_ffn) if shared and facts.shared_ffn else None
    parts = [p for p, w in (("experts", ew), ("shared expert", sw)) if w is not None]
    if not parts:
        raise StrategyError("this model has no expert channels to shrink")
    label = f"shrink: {fraction:.0%} of the channels of " + " and ".join(parts) + f" by {metric}"
    moe = tuple(i for i in range(facts.layers or 0) if facts.is_moe_layer(i))
    return Candidate(
        "shrink", label, metric=metric, expert_width=ew, shared_width=sw, moe_layers=moe
    )
