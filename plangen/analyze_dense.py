"""The dense row of `plangen analyze` (`DENSE`): layers, KV groups and MLP channels.

prepare      the tables to measure (`needed_metrics`), the memory estimate, and
             with --scores the candidates, before the model is loaded
measure      one calibration pass (`calibrate.collect`) → score tables
             (`scores.compute_tables`), plus the layer-removal losses on request
candidates   every strategy's candidates (`strategies`), or the one asked,
             brought inside --target; reconstructed ones solved once (`_Solver`)
finish       the chosen candidate's reconstructed weights into the sidecar
beside       --csv and --plot
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compiler.architectures import Architecture
from compiler.checkpoint import CheckpointFacts
from compiler.facts import ModelFacts
from compiler.parse import parse
from plangen import emit
from plangen.candidate import Candidate
from plangen.metrics import OBS
from plangen.options import Options
from plangen.pipeline import (
    AnalyzeError,
    Kind,
    Run,
    aimed,
    calibration_line,
    distinct,
    say,
    scores_metadata,
    shape_key,
)
from plangen.plot import plot_plan
from plangen.scores import ScoreTables, compute_tables, dense_layers, geometry
from plangen.strategies import Budget, StrategyError, parse_layer_range
from plangen.strategies.depth import depth, layers_for_budget
from plangen.strategies.global_budget import TRUST_REGION, global_budget
from plangen.strategies.unbalanced import parse_distribution, unbalanced
from plangen.strategies.uniform import uniform

if TYPE_CHECKING:
    from executor.layerwise import LayerWalk
    from plangen.reconstruct import Settings, SharedGrams

OBS_ALLOCATION = "taylor"  # ... with the widths allocated by this measured table
DEFAULT_TARGET = 0.75


# ---- what to measure ------------------------------------------------------------------


def default_metric(strategy: str) -> str:
    return "flap" if strategy == "flap" else "taylor"


def needed_metrics(opts: Options) -> list[str]:
    if opts.strategy == "auto":
        # The forward statistics and the summed gradient are paid for: every metric
        # built from them comes free into the sidecar for later re-planning. The
        # Fisher term costs about 0.4 forward passes more, so taylor2 is on request.
        from plangen.metrics import WIDTH_METRIC_NAMES

        return [m for m in WIDTH_METRIC_NAMES if m != "taylor2"]
    if opts.strategy == "depth":
        return []
    if opts.metric == OBS:
        return [OBS_ALLOCATION]
    return [opts.metric or default_metric(opts.strategy)]


def needs_removal(opts: Options) -> bool:
    return (opts.strategy == "depth" and opts.metric == "removal") or (
        opts.strategy == "unbalanced" and opts.importance == "removal"
    )


def checked_candidates(opts: Options, facts: ModelFacts, scores: ScoreTables) -> list[Candidate]:
    """`candidates`, with a table the scores lack (an earlier sidecar measured for
    another strategy) said as an error that names the fix."""
    try:
        return candidates(opts, facts, scores)
    except StrategyError as exc:
        raise AnalyzeError(str(exc)) from None
    except KeyError as exc:
        if opts.scores is None:  # pragma: no cover - the calibration measured what it needs
            raise
        what = exc.args[0] if exc.args and isinstance(exc.args[0], str) else repr(exc)
        if what in ("block_influence", "angular", "removal"):
            what = f"the scores have no `{what}` table"
        raise AnalyzeError(
            f"--scores {opts.scores}: {what}; re-run without --scores to measure them, "
            "or choose a --strategy / --metric the sidecar has"
        ) from None


# ---- candidates -----------------------------------------------------------------------


def _edge_range(layers: int) -> list[int]:
    """LLM-Pruner's block-wise range: the first eighth and the last sixteenth left whole."""
    return list(range(round(layers / 8), layers - max(1, round(layers / 16))))


def reconstructed(cand: Candidate) -> Candidate:
    """The same cuts with the narrowed projections re-solved instead of compensated."""
    if not (cand.mlp_width or cand.groups_dropped):
        return cand  # a depth plan: nothing to re-solve
    label = cand.label.replace(", compensated", "")
    return dataclasses.replace(
        cand, compensate=False, reconstruct=True, label=f"{label}, reconstructed"
    )


def by_obs(cand: Candidate) -> Candidate:
    """The same widths, reconstructed, with the MLP channels picked in the walk by OBS."""
    if cand.groups_dropped:
        raise AnalyzeError(
            "--metric obs picks MLP channels in the reconstruction walk; KV groups need a "
            "measured metric: add --parts mlp, or use --metric taylor --reconstruct"
        )
    label = cand.label.replace(f" {cand.metric}", "").replace(", compensated", "")
    return dataclasses.replace(
        cand,
        metric=OBS,
        compensate=False,
        reconstruct=True,
        label=f"{label}, OBS channels, reconstructed",
    )


def candidates(opts: Options, facts: ModelFacts, scores: ScoreTables) -> list[Candidate]:
    if opts.metric == OBS and opts.strategy != "auto":
        shaped = dataclasses.replace(opts, metric=OBS_ALLOCATION, compensate=False)
        return [by_obs(c) for c in _candidates(shaped, facts, scores)]
    out = _candidates(opts, facts, scores)
    if opts.reconstruct and opts.strategy != "auto":
        out = [reconstructed(c) for c in out]
    budget = Budget.of(facts, scores, opts.target_params or DEFAULT_TARGET)
    return aimed(out, opts, facts, budget)


def _candidates(opts: Options, facts: ModelFacts, scores: ScoreTables) -> list[Candidate]:
    """The candidates of `--strategy` (auto: `_auto`), before --target and the
    reconstructed / OBS variants of `candidates`."""
    n = facts.layers or 0
    if opts.drop is not None or opts.drop_frac is not None:
        if opts.strategy not in ("auto", "depth"):
            raise AnalyzeError("--drop and --drop-frac belong to --strategy depth")
        count = opts.drop if opts.drop is not None else round((opts.drop_frac or 0) * n)
        budget = Budget.of(facts, scores, 0.5)
        return [
            depth(budget, count, opts.metric or "block_influence", opts.keep_last_layer, opts.split)
        ]
    keep = opts.target_params if opts.target_params is not None else DEFAULT_TARGET
    budget = Budget.of(facts, scores, keep)
    # The layer ranges are checked whatever the strategy (auto does not use them).
    attn = parse_layer_range(opts.attn_layers, n, "--attn-layers")
    mlp = parse_layer_range(opts.mlp_layers, n, "--mlp-layers")
    if opts.parts == "mlp":
        attn = []
    elif opts.parts == "attn":
        mlp = []
    if opts.strategy == "auto":
        return _auto(opts, budget, n)
    return [_one_strategy(opts, budget, attn, mlp)]


def _one_strategy(opts: Options, budget: Budget, attn: list[int], mlp: list[int]) -> Candidate:
    """The one candidate of an explicit `--strategy` at `budget`, pruning attention in
    the layers `attn` and MLPs in `mlp`."""
    metric = opts.metric or default_metric(opts.strategy)
    match opts.strategy:
        case "depth":
            score = opts.metric or "block_influence"
            return depth(budget, layers_for_budget(budget), score, opts.keep_last_layer, opts.split)
        case "uniform":
            return uniform(
                budget, metric, attn, mlp, opts.ratio, opts.compensate, opts.round_groups
            )
        case "unbalanced":
            return unbalanced(
                budget,
                metric,
                opts.importance,
                opts.allocation,
                parse_distribution(opts.distribution),
                opts.freeze_top,
                opts.compensate,
            )
        case "global":
            return global_budget(
                budget,
                metric,
                sorted(set(attn) | set(mlp)),
                opts.rank,
                attention=bool(attn),
                compensate=opts.compensate,
                remove_empty_layers=opts.remove_empty_layers,
                max_layer_cut=opts.layer_cut,
                trust=TRUST_REGION if opts.layer_cut is None and opts.trust else None,
            )
        case "flap":
            return global_budget(budget, metric, None, "score", compensate=True)
    raise AnalyzeError(f"unknown --strategy {opts.strategy!r}")  # pragma: no cover - resolved


def _auto(opts: Options, budget: Budget, n: int) -> list[Candidate]:
    """auto: the strategies above with their published defaults, compensated (FLAP's
    bias never hurt in any measurement here), and reconstructed variants, every one
    judged on held-out loss. Each reconstructed candidate costs one walk."""
    edge = _edge_range(n)
    every = list(range(n))
    mlp_global = global_budget(
        budget, "taylor", None, "per-param", attention=False, trust=TRUST_REGION
    )
    both_global = global_budget(budget, "taylor", None, "per-param", trust=TRUST_REGION)
    rebuilt = [
        by_obs(uniform(budget, "taylor", [], every)),
        by_obs(mlp_global),
        reconstructed(both_global),
    ]
    out = [
        depth(budget, layers_for_budget(budget), "block_influence", opts.keep_last_layer),
        uniform(budget, "taylor", [], edge, compensate=True),
        unbalanced(budget, "taylor", compensate=True),
        global_budget(budget, "taylor", None, "per-param", compensate=True, trust=TRUST_REGION),
        global_budget(
            budget,
            "taylor",
            None,
            "per-param",
            attention=False,
            compensate=True,
            trust=TRUST_REGION,
        ),
        global_budget(budget, "flap", None, "score", compensate=True),
        *(c for c in rebuilt if c.reconstruct),
    ]
    return distinct(out)


# ---- the stages ----------------------------------------------------------------------


def _prepare(r: Run) -> None:
    """The tables to measure, refused when unknown, and whether that takes gradients
    (what the memory estimate counts); with --scores the candidates, so a table the
    sidecar lacks is said before the model is loaded."""
    from plangen.metrics.registry import WIDTH_METRICS

    r.metrics = needed_metrics(r.opts)
    for m in r.metrics:
        if m not in WIDTH_METRICS:
            raise AnalyzeError(f"unknown --metric {m!r} (one of {', '.join(WIDTH_METRICS)})")
    r.gradients = _gradients(r.metrics) and r.given is None
    if r.given is not None:
        r.cands = checked_candidates(r.opts, r.facts, r.given)


def _gradients(metrics: list[str]) -> bool:
    """Whether measuring `metrics` takes a backward pass."""
    from plangen.metrics.registry import WIDTH_METRICS

    return any(WIDTH_METRICS[m].needs == "gradients" for m in metrics)


def _measure(r: Run) -> ScoreTables:
    """One calibration pass (a backward too for gradient metrics) that scores the width
    metrics layer by layer as it walks, the score tables assembled from it, and the
    layer-removal losses when the strategy ranks layers by them."""
    from plangen.calibrate import collect

    opts = r.opts
    assert r.walk is not None and opts.device is not None
    gradients = _gradients(r.metrics)
    say(
        opts,
        f"plangen: calibrating on {len(r.calib)} x {opts.seqlen} tokens of {opts.calib}"
        + (" (forward + backward)" if gradients else ""),
    )
    r.grams = _shared_grams(r)
    calib = collect(
        None,
        r.ckpt.arch,
        r.calib,
        metrics=r.metrics,
        scored=dense_layers(r.facts),
        seed=opts.seed,
        gradients=gradients,
        fisher="taylor2" in r.metrics,
        geom=geometry(r.facts),
        progress=opts.progress,
        walk=r.walk,
        observers=[r.grams] if r.grams is not None else (),
        reserve=r.grams.nbytes(r.facts) if r.grams is not None else 0,
    )
    # The forward walk, then the reverse sweep: each layer recomputed (one forward) and
    # back-propagated (about two); fused, batch by batch, nothing is recomputed.
    r.passes += (3.0 if calib.fused else 4.0) if gradients else 1.0
    r.phases["calibrate"] = time.perf_counter() - r.started - sum(r.phases.values())
    scores = compute_tables(r.facts, calib, r.metrics)
    r.phases["score"] = time.perf_counter() - r.started - sum(r.phases.values())
    del calib
    if needs_removal(opts):
        losses = removal_losses(r.walk, r.ckpt.arch, r.facts, scores, r.held, opts)
        scores.tables["removal"] = np.asarray(losses)
        r.passes += (r.facts.layers or 0) * len(r.held) / len(r.calib)
    scores.metadata = scores_metadata(opts, r.facts, r.text_sha, r.metrics, r.weights)
    return scores


def reconstructs(opts: Options) -> bool:
    """Whether some candidate will be reconstructed (auto's always are)."""
    return opts.strategy == "auto" or opts.reconstruct or opts.metric == OBS


def _shared_grams(r: Run) -> SharedGrams | None:
    """The unpruned model's Grams, gathered by the calibration's forward walk, when a
    one-shot reconstruction will solve on them (the one-shot mode, and auto's judge of
    its reconstructed candidates: `_Solver`) and they fit beside the calibration in
    memory (else the reconstruction walks the model once more to gather them; said)."""
    from plangen.memory import Footprint, room_beside, size
    from plangen.reconstruct import SharedGrams

    opts = r.opts
    if not (opts.one_shot or opts.strategy == "auto") or not reconstructs(opts):
        return None  # no one-shot solve: auto's judge, or the one-shot mode
    need = SharedGrams.nbytes(r.facts)
    width = 2 if opts.dtype == "bfloat16" else 4
    tokens = opts.nsamples * opts.seqlen
    on_disk = r.placement.states != "host"
    if room_beside(need, Footprint.of(r.ckpt), width, tokens, r.gradients, on_disk):
        return SharedGrams(r.ckpt.arch)
    say(
        opts,
        f"plangen: the one-shot reconstruction's Grams ({size(need)}) do not fit beside the "
        "calibration: they are gathered in a walk of their own after it",
    )
    return None


def _candidates_and_solver(r: Run) -> list[Candidate]:
    """The candidates (made already with --scores), and the solver that reconstructs
    one for the judge, once."""
    assert r.scores is not None
    cands = r.cands if r.cands is not None else checked_candidates(r.opts, r.facts, r.scores)
    r.solutions = _Solver(r, cands)
    return cands


def _finish(r: Run, chosen: Candidate) -> tuple[float, float] | None:
    """A reconstructed winner's weights into the sidecar: solved for the judge, or,
    judged on shared one-shot solves, solved again in the mode asked and its held-out
    loss measured again (returned: first round, all windows)."""
    from plangen.heldout import first_round, judge_again

    solver = r.solutions
    assert isinstance(solver, _Solver) and r.scores is not None and r.walk is not None
    again = None
    if chosen.reconstruct:
        solved = solver.final(chosen)
        _attach_reconstruction(r.scores, solved, chosen, r.ckpt, r.facts, r.opts)
        if solver.again:
            assert r.cands is not None
            first = first_round(len(r.cands), len(r.held))
            again = judge_again(r.walk, r.facts, r.scores, chosen, r.held, solved, first)
            r.passes += len(r.held) / len(r.calib)
    if solver.seconds:
        r.phases["reconstruct"] = solver.seconds
        r.passes += solver.passes
    return again


def _beside(r: Run, chosen: Candidate, plan_path: Path) -> None:
    """--csv (the per-unit scores) and --plot (PLAN.png), after the plan is written."""
    assert r.scores is not None
    if r.opts.csv is not None:
        _write_csv(r.opts.csv, r.facts, r.scores, chosen)
    if r.opts.plot:
        plot_plan(plan_path.with_suffix(".png"), r.facts, r.scores, chosen)


def removal_losses(
    walk: LayerWalk,
    arch: Architecture,
    facts: ModelFacts,
    scores: ScoreTables,
    held: list,
    opts: Options,
) -> list[float]:
    """Held-out loss with each layer bypassed in turn (higher = the layer matters more),
    all in one walk: the variant without layer d shares the original's states up to d."""
    from plangen.heldout import Variant, walk_losses
    from plangen.surgery import applied_layer

    def bypassed(d: int) -> Variant:
        cand = Candidate("depth", "", drop=(d,))
        return lambda i, layer: (
            applied_layer(layer, i, arch, facts, cand, scores) if i == d else None
        )

    variants = [bypassed(d) for d in range(facts.layers or 0)]
    return walk_losses(walk, held, variants, progress=opts.progress, desc="removal")


class _Solver:
    """The reconstruction of the reconstructed candidates, for the judge and then for
    the sidecar; the time and forward passes it spends are counted apart.

    For the judge every reconstructed candidate is solved together in one walk
    (`reconstruct.solve_all`: each layer loaded once serves them all) when the first
    is asked for. With several of them (auto's three) and a sequential or residual
    mode, they are judged on one-shot solves, whose statistics they share (one Gram
    and one OBS ranking per layer on the unpruned model, gathered by the calibration
    when they fit: `SharedGrams`), and only the winner is then solved in the mode
    asked (`final`): one walk instead of one per candidate."""

    def __init__(self, r: Run, cands: list[Candidate]) -> None:
        from plangen.reconstruct import Settings

        assert r.walk is not None and r.scores is not None
        self.walk, self.arch, self.facts, self.scores = r.walk, r.ckpt.arch, r.facts, r.scores
        self.windows, self.opts, self.grams = r.calib, r.opts, r.grams
        self.todo = [c for c in cands if c.reconstruct]
        opts = r.opts
        self.asked = Settings(opts.damp, opts.one_shot, opts.residual)
        shared = len({shape_key(c) for c in self.todo}) > 1
        self.judging = Settings(opts.damp, one_shot=True) if shared else self.asked
        self.cache: dict[tuple[object, ...], list] = {}
        self.seconds = 0.0
        self.passes = 0.0

    @property
    def again(self) -> bool:
        """Whether the winner is solved again after the judge (in the mode asked)."""
        return self.judging != self.asked

    def __call__(self, cand: Candidate) -> list:
        """The candidate's solves as the judge measures it."""
        key = shape_key(cand)
        if key not in self.cache:
            jobs = [c for c in self.todo if shape_key(c) not in self.cache]
            if key not in {shape_key(c) for c in jobs}:
                jobs.append(cand)
            for c, s in zip(jobs, self._solve(jobs, self.judging), strict=True):
                self.cache[shape_key(c)] = s
        return self.cache[key]

    def final(self, cand: Candidate) -> list:
        """The candidate's solves in the mode asked: the judge's, or one walk more."""
        if not self.again:
            return self(cand)
        return self._solve([cand], self.asked)[0]

    def _solve(self, jobs: list[Candidate], settings: Settings) -> list[list]:
        from plangen.reconstruct import in_step_walk, one_shot_walks, sequential_passes, solve_all

        started = time.perf_counter()
        pairs = [(c, None) for c in jobs]
        in_step = in_step_walk(self.walk, self.facts, self.windows)
        solved = solve_all(
            self.walk,
            self.arch,
            self.facts,
            pairs,
            self.scores,
            self.windows,
            settings,
            self.opts.progress,
            grams=self.grams if settings.one_shot else None,
            in_step=in_step,
        )
        self.seconds += time.perf_counter() - started
        if settings.one_shot:  # one walk per stream of shared inputs not gathered already
            self.passes += one_shot_walks(pairs, self.facts, self.grams)
        else:
            self.passes += sequential_passes(self.facts, settings, solved, in_step)
        return solved


def _attach_reconstruction(
    scores: ScoreTables,
    solved: list,
    cand: Candidate,
    ckpt: CheckpointFacts,
    facts: ModelFacts,
    opts: Options,
) -> None:
    """Put the re-solved weights in the sidecar, with the plan they were solved for."""
    from plangen.reconstruct import attach

    draft = emit.plan_text(
        cand,
        emit.Header(ckpt.model_block(), "", "draft", "0" * 64, calibration_line(opts), []),
        scores,
        facts.ffn or 0,
    )
    plan = parse(draft).plan
    assert plan is not None  # emit's own output
    attach(
        scores,
        solved,
        plan,
        facts,
        damp=opts.damp,
        one_shot=opts.one_shot,
        residual=opts.residual,
        samples=opts.nsamples,
        seqlen=opts.seqlen,
    )


def _write_csv(path: Path, facts: ModelFacts, scores: ScoreTables, cand: Candidate) -> None:
    """One row per KV group and MLP channel: layer, unit, index, score, kept."""
    import csv

    from compiler.sidecar import table_name
    from plangen.scores import dense_layers

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "unit", "index", "metric", "score", "kept"])
        for i in dense_layers(facts):
            channels = scores.tables[table_name(cand.metric, i, "mlp")]
            groups = scores.tables.get(table_name(cand.metric, i, "attn"), ())  # none for obs
            dropped_layer = i in cand.drop
            for g, v in enumerate(groups):
                gone = dropped_layer or g in cand.groups_dropped.get(i, ())
                w.writerow([i, "kv_group", g, cand.metric, f"{v:.6g}", int(not gone)])
            kept = set(cand.kept_channels(scores, i)) if i in cand.mlp_width else None
            for c, v in enumerate(channels):
                on = not dropped_layer and (kept is None or c in kept)
                w.writerow([i, "channel", c, cand.metric, f"{v:.6g}", int(on)])


DENSE = Kind(
    name="dense",
    applies=lambda facts: not facts.is_moe,
    prepare=_prepare,
    measure=_measure,
    candidates=_candidates_and_solver,
    finish=_finish,
    beside=_beside,
    lone_strategy=True,
)
