"""`plangen analyze` on a mixture-of-experts model: which experts to drop.

The same protocol as dense models (`plangen.analyze`): the calibration pool's
first windows measure, the held-out windows after them judge, the evaluation
pool is never seen. One forward pass collects every MoE layer's router
statistics (`plangen.metrics.router`); NAEE's greedy search runs layer by
layer over cached states for the asked drop count, once plain and once with
`rescale` in its error. Each score gives a candidate (the same count dropped in
every MoE layer, `plangen.strategies.experts`), with and without `rescale`;
all are judged on held-out loss and the best is written, the others listed in
the plan's comments.

Measured on the trained Qwen2-MoE fixture (16 experts, top-2; builtin corpus,
24 evaluation windows of 512, original 21.11): dropping 4 / 8 experts per
layer by mean routing weight gives 21.86 / 25.29, 21.61 / 23.78 rescaled, and
21.30 / 23.10 rescaled and allocated over layers by measured loss (the default);
NAEE 21.70 / 25.55, rescaled 21.46 / 23.95 (see benchmarks/moe_peers.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from compiler.facts import ModelFacts
from compiler.sidecar import table_name
from plangen.candidate import Candidate, original_params
from plangen.metrics.router import (
    NAEE,
    ROUTER_METRICS,
    RouterStats,
    collect_router,
    naee_orders,
    removal_curves,
)
from plangen.options import Options
from plangen.pipeline import (
    AnalyzeError,
    Kind,
    Run,
    aimed,
    distinct,
    nothing,
    say,
    scores_metadata,
)
from plangen.scores import ScoreTables, UnitTables
from plangen.strategies import StrategyError
from plangen.strategies.experts import (
    DEFAULT_DROP_EXPERTS,
    allocate_experts,
    drop_order,
    experts_to_drop,
    keep_experts,
    probe_counts,
    shrink_experts,
)
from plangen.strategies.moe_budget import drops_for, group_counts, moe_budget

# NAEE's search with `rescale` in its error is its own ranking.
NAEE_RESCALED = "naee_rescaled"
EXPERT_SCORES = (*ROUTER_METRICS, NAEE, NAEE_RESCALED)
# The default candidates: the router statistics of one forward pass. NAEE (`--metric
# naee` / `naee_rescaled`) costs about 50 forward passes per search on the fixture
# (every expert tried at every step of every layer) and did not win there.
DEFAULT_SCORES = ROUTER_METRICS
# Channels inside the experts: Wanda's structured score, routed (`RouterStats`).
WIDTH_SCORE = "wanda"
# The allocated candidate: drops spread over layers by the measured loss of dropping
# this score's lowest experts in one layer at a time, rescaled, on this many
# calibration windows (8,192 tokens at seqlen 512: the 4 held-out windows were too
# few to rank layers, 21.31 / 27.80 on the fixture; these give 21.30 / 23.10).
ALLOCATE_BY = "routing_weight"
PROBE_WINDOWS = 16
# The probed drop counts and each MoE layer's loss at them (`removal_curves`).
Allocation = tuple[list[int], dict[int, np.ndarray]]


def _prepare(r: Run) -> None:
    """The size options and the scores asked, refused before any window is read."""
    moe_size(r.opts, r.facts)
    r.metrics = _metrics(r.opts)


def _moe_layers(facts: ModelFacts) -> list[int]:
    return [i for i in range(facts.layers or 0) if facts.is_moe_layer(i)]


def _measure(r: Run) -> ScoreTables:
    """`_measured` on every window in every process under torchrun: the router
    statistics and NAEE's search are not split (NAEE reads the first tokens of all the
    windows at once); the probes and the judge after them are."""
    from executor import distributed

    with distributed.whole():
        return _measured(r)


def _measured(r: Run) -> ScoreTables:
    """One forward pass for every MoE layer's router statistics (and, for a budget,
    the dense axes' input statistics), then NAEE's searches when asked."""
    opts, facts = r.opts, r.facts
    assert r.walk is not None
    size = moe_size(opts, facts)
    moe_layers = _moe_layers(facts)
    experts = facts.experts or 0
    say(
        opts,
        f"plangen: router statistics on {len(r.calib)} x {opts.seqlen} tokens of "
        f"{opts.calib}; {size.describe(experts)}",
    )
    mark = time.perf_counter()
    # A budget also weighs the dense axes: the same pass measures the inputs of
    # every layer's o_proj and dense down_proj and scores its KV groups and dense
    # MLP channels while the layer is loaded.
    units = None
    if size.keep_params is not None:
        units = UnitTables(r.ckpt.arch, facts, WIDTH_SCORE)
    stats = collect_router(
        None,
        r.ckpt.arch,
        moe_layers,
        experts,
        r.calib,
        progress=opts.progress,
        also=None if units is None else units.watch,
        after=None if units is None else units.score,
        walk=r.walk,
    )
    forward = time.perf_counter() - mark
    r.passes += 1.0
    r.phases["calibrate"] = forward
    tables = _router_tables(stats)
    if units is not None:
        tables |= units.tables
    _naee(r, tables, size.drop, forward)
    return ScoreTables(tables, scores_metadata(opts, facts, r.text_sha, r.metrics, r.weights))


def _router_tables(stats: dict[int, RouterStats]) -> dict[str, np.ndarray]:
    """The per-expert tables of every MoE layer, and the channel scores inside the
    routed and shared experts."""
    tables = {
        table_name(m, k, "experts"): v
        for k, layer_stats in stats.items()
        for m, v in layer_stats.tables().items()
    }
    for k, layer_stats in stats.items():  # channel scores inside the experts
        if layer_stats.expert_channels is not None:
            tables[table_name(WIDTH_SCORE, k, "experts_ffn")] = layer_stats.expert_channels
        if layer_stats.shared_channels is not None:
            tables[table_name(WIDTH_SCORE, k, "shared")] = layer_stats.shared_channels
    return tables


def _naee(r: Run, tables: dict[str, np.ndarray], drop: int, forward: float) -> None:
    """NAEE's greedy searches (plain, and with `rescale` in its error) when asked, into
    `tables`; their cost is counted in forward passes of the router pass (`forward`)."""
    assert r.walk is not None
    moe_layers = _moe_layers(r.facts)
    mark = time.perf_counter()
    prob = {k: tables[table_name("router_prob", k, "experts")] for k in moe_layers}
    for name, rescaled in ((NAEE, None), (NAEE_RESCALED, prob)):
        if name in r.metrics:
            orders = naee_orders(
                None,
                r.ckpt.arch,
                moe_layers,
                r.facts.experts or 0,
                drop,
                r.calib,
                prob=rescaled,
                batch_size=r.opts.batch_size,
                device=r.opts.device,
                progress=r.opts.progress,
                walk=r.walk,
            )
            tables |= {table_name(name, k, "experts"): v for k, v in orders.items()}
    if any(m in r.metrics for m in (NAEE, NAEE_RESCALED)):
        r.phases["naee"] = time.perf_counter() - mark
        r.passes += r.phases["naee"] / max(forward, 1e-9)


def _candidates(r: Run) -> list[Candidate]:
    """The allocation probes (when the drops are spread over layers by measured loss),
    then every score's candidates for the size asked, told apart and inside --target."""
    assert r.scores is not None
    size = moe_size(r.opts, r.facts)
    moe_layers = _moe_layers(r.facts)
    allocated = None
    if size.drop and ALLOCATE_BY in r.metrics and len(moe_layers) > 1:
        mark = time.perf_counter()
        allocated = _curves(r, size.drop)
        r.phases["probe"] = time.perf_counter() - mark
        probes = len(moe_layers) * (len(probe_counts(r.facts, size.drop)) - 1) + 1
        r.passes += probes * min(PROBE_WINDOWS, len(r.calib)) / len(r.calib)
    cands: list[Candidate] = []
    try:
        if size.keep_params is not None:
            cands += _budgeted(r.facts, r.scores, r.metrics, size.keep_params, allocated)
        else:
            cands += _sized(r.facts, r.scores, r.metrics, size.drop, size.shrink, allocated)
    except StrategyError as exc:
        raise AnalyzeError(f"{exc}; re-run without --scores to measure it") from None
    return aimed(distinct(cands), r.opts, r.facts, None)


@dataclass(frozen=True)
class Size:
    """What the size options ask of a MoE model: experts dropped per layer (`drop`,
    the count the probes and NAEE's search aim at), each expert's channels removed
    (`shrink`), or a parameter budget over both (`keep_params`)."""

    drop: int
    shrink: float | None = None
    keep_params: int | None = None

    def describe(self, experts: int) -> str:
        if self.keep_params is not None:
            return (
                f"a budget of {self.keep_params:,} parameters over expert drops (up to "
                f"{self.drop} of {experts} per MoE layer), expert width and KV groups"
            )
        parts = [f"{self.drop} of {experts} experts to drop per MoE layer"] if self.drop else []
        if self.shrink is not None:
            parts.append(f"{self.shrink:.0%} of every expert's channels to remove")
        return " and ".join(parts)


def _curves(r: Run, drop: int) -> Allocation:
    """Each layer's loss when its lowest experts by ALLOCATE_BY are dropped alone, at
    the counts of `probe_counts(drop)`, rescaled, on the first PROBE_WINDOWS
    calibration windows: what `allocate_experts` spreads the drops by."""
    assert r.scores is not None
    facts, tables = r.facts, r.scores.tables
    moe_layers = _moe_layers(facts)
    order = {k: drop_order(facts, tables, ALLOCATE_BY, k) for k in moe_layers}
    counts = probe_counts(facts, drop)
    prob = {k: tables[table_name("router_prob", k, "experts")] for k in moe_layers}
    assert r.walk is not None
    curves = removal_curves(
        r.walk,
        moe_layers,
        facts.experts or 0,
        order,
        counts,
        r.calib[:PROBE_WINDOWS],
        prob,
        progress=r.opts.progress,
    )
    return counts, curves


def _sized(
    facts: ModelFacts,
    scores: ScoreTables,
    metrics: list[str],
    drop: int,
    shrink: float | None,
    allocation: Allocation | None,
) -> list[Candidate]:
    """`--drop-experts` and/or `--shrink-experts`: every score's drops, plain and
    rescaled, and the allocated drops, each narrowed by `shrink` when asked; the
    routed experts only (their parameters are the bulk; the shared expert's width is
    a hand edit away, `moe ... shared width N by wanda`)."""
    width = shrink_experts(facts, WIDTH_SCORE, shrink, shared=False) if shrink else None
    cands = []
    for m in metrics if drop else ():
        for rescale in (False, True) if m != NAEE_RESCALED else (True,):
            if m == NAEE and rescale:
                continue  # NAEE's rescaled form is its own search (NAEE_RESCALED)
            cands.append(keep_experts(facts, scores.tables, m, drop, rescale))
    if allocation is not None:
        counts, curves = allocation
        cands.append(
            allocate_experts(facts, scores.tables, ALLOCATE_BY, drop, counts, curves, True)
        )
    if width is None:
        return cands
    if not cands:
        return [width]
    return [
        dataclasses.replace(
            c,
            label=f"{c.label} + {width.label}",
            expert_width=width.expert_width,
            moe_layers=width.moe_layers,
            width_metric=WIDTH_SCORE,
        )
        for c in cands
    ]


def _budgeted(
    facts: ModelFacts,
    scores: ScoreTables,
    metrics: list[str],
    keep_params: int,
    allocation: Allocation | None,
) -> list[Candidate]:
    """`--target-params` on a MoE model: the splits of `moe_budget` for every score;
    ALLOCATE_BY's also allocated over layers, with the shared expert narrowed too and
    with KV groups dropped (one score's worth of each: on the fixture, narrowing the
    shared expert lost every time). KV groups only where every layer's were scored
    (a sidecar of `--drop-experts` has no attention tables)."""
    n = facts.layers or 0
    scored = all(scores.has(table_name(WIDTH_SCORE, i, "attn")) for i in range(n))
    cands = []
    for m in metrics:
        main = m == ALLOCATE_BY
        use = allocation if main else None
        groups = group_counts(facts) if main and scored else [0]
        cands += moe_budget(
            facts, scores.tables, keep_params, m, WIDTH_SCORE, use, shared=main, groups=groups
        )
    return cands


def moe_size(opts: Options, facts: ModelFacts) -> Size:
    """The MoE size options: `--drop-experts F`, `--shrink-experts F` (either or both),
    or `--target-params F` (a budget over both); `--drop-experts 0.25` by default."""
    others = [
        flag
        for flag, value in (
            ("--drop", opts.drop),
            ("--drop-frac", opts.drop_frac),
            ("--ratio", opts.ratio),
        )
        if value is not None
    ]
    if others:
        raise AnalyzeError(
            f"{others[0]} on a mixture-of-experts model: its size options are "
            "--drop-experts F (the fraction of routed experts to remove from every MoE "
            "layer), --shrink-experts F (of every expert's channels) or --target-params F "
            "(the fraction of parameters kept, spent on both)"
        )
    try:
        if opts.target_params is not None:
            if opts.drop_experts is not None or opts.shrink_experts is not None:
                raise AnalyzeError(
                    "--target-params with --drop-experts or --shrink-experts: give the "
                    "budget alone (it picks the split between drops and width) or the "
                    "sizes alone"
                )
            if not 0.0 < opts.target_params < 1.0:
                raise StrategyError(
                    "--target-params must be between 0 and 1 (the fraction kept), got "
                    f"{opts.target_params}"
                )
            keep = round(original_params(facts) * opts.target_params)
            return Size(drops_for(facts, keep), keep_params=keep)
        if opts.shrink_experts is not None and opts.drop_experts is None:
            return Size(0, shrink=opts.shrink_experts)
        fraction = opts.drop_experts if opts.drop_experts is not None else DEFAULT_DROP_EXPERTS
        return Size(experts_to_drop(facts, fraction), shrink=opts.shrink_experts)
    except StrategyError as exc:
        raise AnalyzeError(str(exc)) from None


def _metrics(opts: Options) -> list[str]:
    """The router scores to measure: the default ones, or the one `--metric` names."""
    if opts.metric is None:
        return list(DEFAULT_SCORES)
    if opts.metric not in EXPERT_SCORES:
        raise AnalyzeError(
            f"--metric {opts.metric!r} does not score experts (one of {', '.join(EXPERT_SCORES)})"
        )
    return [opts.metric]


MOE = Kind(
    name="moe",
    applies=lambda facts: facts.is_moe,
    prepare=_prepare,
    measure=_measure,
    candidates=_candidates,
    finish=nothing,
    beside=nothing,
    lone_strategy=False,
)
