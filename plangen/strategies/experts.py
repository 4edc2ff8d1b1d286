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


def drop_order(
    facts: ModelFacts, tables: dict[str, np.ndarray], metric: str, layer: int
) -> list[int]:
    """The layer's experts in the order they go, lowest `metric` first (ties: the higher
    index first, as with KV groups). With group-limited routing (`expert_groups`) the
    groups take turns, so any prefix of G x m drops m from every group (P112)."""
    name = table_name(metric, layer, "experts")
    if name not in tables:
        raise StrategyError(f"no `{metric}` expert scores for layer {layer} (table {name})")
    score = np.asarray(tables[name], dtype=np.float64)
    groups = facts.expert_groups or 1
    size = len(score) // groups
    per_group = []
    for g in range(groups):
        order = np.argsort(-score[g * size : (g + 1) * size], kind="stable")[::-1]
        per_group.append([g * size + int(e) for e in order])
    return [per_group[g][t] for t in range(size) for g in range(groups)]


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
    dropped = {i: tuple(sorted(drop_order(facts, tables, metric, i)[:drop])) for i in moe_layers}
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


def probe_counts(facts: ModelFacts, drop: int) -> list[int]:
    """The drop counts each layer is probed at for `allocate_experts`: 0 up to twice the
    uniform count (never below top_k left), in steps of an eighth of it, multiples of
    the routing groups: at most about 16 probes per layer whatever the expert count.
    (Steps of a quarter, interpolated, allocated worse on the fixture: 23.54 against
    23.10 at 8 of 16 experts.)"""
    n, top_k, groups = facts.experts or 0, facts.top_k or 1, facts.expert_groups or 1
    most = min(n - top_k, 2 * drop)
    most -= most % groups
    step = max(groups, (drop // 8) // groups * groups)
    return list(range(0, most + 1, step))


def allocate_experts(
    facts: ModelFacts,
    tables: dict[str, np.ndarray],
    metric: str,
    drop: int,
    counts: list[int],
    curves: dict[int, np.ndarray],
    rescale: bool,
) -> Candidate:
    """The same total as `keep_experts` (drop x MoE layers), spread over the layers by
    measured loss: greedily, the next unit of drops (one routing group's worth) goes
    where the probed loss curve, interpolated between its probes, rises least. Each
    layer drops its lowest-scoring experts by `metric`."""
    groups = facts.expert_groups or 1
    layers = sorted(curves)
    cnt = dict.fromkeys(layers, 0)
    most = counts[-1]

    def cost(k: int, c: int) -> float:
        return float(np.interp(c, counts, curves[k]))

    for _ in range(drop * len(layers) // groups):
        open_ = [k for k in layers if cnt[k] + groups <= most]
        if not open_:
            raise StrategyError("the probed range cannot hold the drops; probe further")
        k = min(open_, key=lambda k: (cost(k, cnt[k] + groups) - cost(k, cnt[k]), k))
        cnt[k] += groups
    dropped = {k: tuple(sorted(drop_order(facts, tables, metric, k)[: cnt[k]])) for k in layers}
    total = sum(cnt.values())
    label = (
        f"experts: {total} of {facts.experts * len(layers)} dropped by {metric}, "
        f"allocated over layers by measured loss ({min(cnt.values())}..{max(cnt.values())} "
        "per layer)" + (", rescaled" if rescale else "")
    )
    return Candidate(
        "experts", label, metric=metric, experts_dropped=dropped, experts_rescale=rescale
    )
