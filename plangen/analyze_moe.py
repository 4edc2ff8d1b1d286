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

import time
from typing import Any

from compiler.checkpoint import CheckpointFacts
from compiler.facts import ModelFacts
from compiler.sidecar import table_name
from plangen.candidate import original_params
from plangen.metrics.router import NAEE, ROUTER_METRICS, collect_router, naee_orders
from plangen.scores import ScoreTables, read_sidecar
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


def run_moe(opts: Any, ckpt: CheckpointFacts, facts: ModelFacts, started: float) -> Any:
    """Analyze a MoE model and write its plan (the `plangen.analyze.run` of MoE models)."""
    import torch

    from executor.loader import load
    from plangen.analyze import (
        AnalyzeError,
        Measured,
        Outcome,
        _finite,
        _provenance,
        _say,
        calibration_windows,
        scores_metadata,
        write_outputs,
    )
    from plangen.heldout import judge, mean_loss

    fraction = _fraction(opts, AnalyzeError)
    try:
        drop = experts_to_drop(facts, fraction) if opts.shrink_experts is None else 0
    except StrategyError as exc:
        raise AnalyzeError(str(exc)) from None
    metrics = _metrics(opts, AnalyzeError)
    phases: dict[str, float] = {}
    pools, calib_windows, held = calibration_windows(opts)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    model = load(opts.model_dir, opts.device, dtype)
    layers = model.get_submodule(ckpt.arch.layers_module)
    moe_layers = [i for i in range(facts.layers or 0) if facts.is_moe_layer(i)]
    experts = facts.experts or 0
    phases["load"] = time.perf_counter() - started
    passes = 0.0
    if opts.scores is not None:
        scores = read_sidecar(opts.scores)
        _say(opts, f"plangen: scores from {opts.scores} (no calibration)")
    else:
        _say(
            opts,
            f"plangen: router statistics on {len(calib_windows)} x {opts.seqlen} tokens of "
            f"{opts.calib}; {drop} of {experts} experts to drop per MoE layer",
        )
        mark = time.perf_counter()
        stats = collect_router(
            model,
            layers,
            moe_layers,
            experts,
            calib_windows,
            batch_size=opts.batch_size,
            device=opts.device,
            progress=opts.progress,
        )
        forward = time.perf_counter() - mark
        passes += 1.0
        phases["calibrate"] = forward
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
        mark = time.perf_counter()
        prob = {k: tables[table_name("router_prob", k, "experts")] for k in moe_layers}
        for name, rescaled in ((NAEE, None), (NAEE_RESCALED, prob)):
            if name in metrics:
                orders = naee_orders(
                    model,
                    ckpt.arch,
                    moe_layers,
                    experts,
                    drop,
                    calib_windows,
                    prob=rescaled,
                    batch_size=opts.batch_size,
                    device=opts.device,
                    progress=opts.progress,
                )
                tables |= {table_name(name, k, "experts"): v for k, v in orders.items()}
        if any(m in metrics for m in (NAEE, NAEE_RESCALED)):
            phases["naee"] = time.perf_counter() - mark
            passes += phases["naee"] / max(forward, 1e-9)
        scores = ScoreTables(tables, scores_metadata(opts, facts, pools.text_sha256, metrics))
    allocated = None
    if drop and ALLOCATE_BY in metrics and len(moe_layers) > 1:
        mark = time.perf_counter()
        allocated = _allocated(model, layers, moe_layers, facts, scores, drop, calib_windows, opts)
        phases["probe"] = time.perf_counter() - mark
        probes = len(moe_layers) * (len(probe_counts(facts, drop)) - 1) + 1
        passes += probes * min(PROBE_WINDOWS, len(calib_windows)) / len(calib_windows)

    cands: list[Any] = []
    try:
        if opts.shrink_experts is not None:
            # The routed experts only (their parameters are the bulk; the shared expert's
            # width is a hand edit away, `moe ... shared width N by wanda`).
            cands += [shrink_experts(facts, WIDTH_SCORE, opts.shrink_experts, shared=False)]
            metrics = []
        for m in metrics:
            for rescale in (False, True) if m != NAEE_RESCALED else (True,):
                if m == NAEE and rescale:
                    continue  # NAEE's rescaled form is its own search (NAEE_RESCALED)
                cands.append(keep_experts(facts, scores.tables, m, drop, rescale))
    except StrategyError as exc:
        raise AnalyzeError(f"{exc}; re-run without --scores to measure it") from None
    if allocated is not None:
        cands.append(allocated)
    cands = _distinct(cands)
    mark = time.perf_counter()
    arch = ckpt.arch
    loss_before = mean_loss(model, held, opts.batch_size, opts.device)
    judged = judge(model, arch, facts, scores, cands, held, opts.batch_size, opts.device)
    phases["judge"] = time.perf_counter() - mark
    passes += (len(held) + sum(j.windows for j in judged)) / len(calib_windows)
    measured = [Measured(j.candidate, j.candidate.params(facts), j.first, j.loss) for j in judged]
    finalists = [m for m in measured if m.loss is not None]
    chosen = min(finalists, key=lambda m: _finite(m.loss))
    why = f"lowest held-out loss of {len(measured)} candidates ({len(finalists)} finalists)"
    provenance = _provenance(opts, facts, pools.text_sha256, why, measured, loss_before)
    plan_path, sidecar = write_outputs(opts, ckpt, facts, scores, chosen.candidate, provenance)
    return Outcome(
        plan_path,
        sidecar,
        chosen,
        measured,
        original_params(facts),
        loss_before,
        why,
        time.perf_counter() - started,
        passes,
        phases,
    )


def _allocated(
    model: Any,
    layers: Any,
    moe_layers: list[int],
    facts: ModelFacts,
    scores: ScoreTables,
    drop: int,
    windows: list,
    opts: Any,
) -> Any:
    """The candidate that spreads the drops over the layers by measured loss: each layer
    probed alone at a few counts (its lowest experts by ALLOCATE_BY dropped, rescaled)
    on the first PROBE_WINDOWS calibration windows, then `allocate_experts`."""
    from plangen.metrics.router import removal_curves

    metric = ALLOCATE_BY
    order = {k: drop_order(facts, scores.tables, metric, k) for k in moe_layers}
    counts = probe_counts(facts, drop)
    prob = {k: scores.tables[table_name("router_prob", k, "experts")] for k in moe_layers}
    curves = removal_curves(
        model,
        layers,
        moe_layers,
        facts.experts or 0,
        order,
        counts,
        windows[:PROBE_WINDOWS],
        prob,
        batch_size=opts.batch_size,
        device=opts.device,
        progress=opts.progress,
    )
    return allocate_experts(facts, scores.tables, metric, drop, counts, curves, rescale=True)


def _distinct(cands: list[Any]) -> list[Any]:
    """Candidates that drop different experts or rescale differently (the first kept)."""
    seen, out = set(), []
    for c in cands:
        key = (
            tuple(sorted(c.experts_dropped.items())),
            c.experts_rescale,
            c.expert_width,
            c.shared_width,
        )
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _fraction(opts: Any, error: type[Exception]) -> float:
    """`--drop-experts`, the one size option a MoE model takes today."""
    others = [
        flag
        for flag, value in (
            ("--target-params", opts.target_params),
            ("--drop", opts.drop),
            ("--drop-frac", opts.drop_frac),
            ("--ratio", opts.ratio),
        )
        if value is not None
    ]
    if others:
        raise error(
            f"{others[0]} on a mixture-of-experts model: budgeting experts together with "
            "attention and MLP width is not built yet; use --drop-experts F (the fraction "
            "of routed experts to remove from every MoE layer)"
        )
    if opts.shrink_experts is not None and opts.drop_experts is not None:
        raise error(
            "--drop-experts and --shrink-experts: one at a time for now (plan one, then "
            "edit the plan to add the other)"
        )
    return opts.drop_experts if opts.drop_experts is not None else DEFAULT_DROP_EXPERTS


def _metrics(opts: Any, error: type[Exception]) -> list[str]:
    if opts.metric is None:
        return list(DEFAULT_SCORES)
    if opts.metric not in EXPERT_SCORES:
        raise error(
            f"--metric {opts.metric!r} does not score experts (one of {', '.join(EXPERT_SCORES)})"
        )
    return [opts.metric]
