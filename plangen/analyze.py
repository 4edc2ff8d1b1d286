"""`plangen analyze`: the pipeline from a checkpoint to a checked plan and its sidecar.

  checkpoint facts → calibration windows (`compiler.corpus`) → one calibration
  pass (`calibrate.collect`) → score tables (`scores`) → candidates
  (`strategies`) → held-out loss of each (`heldout`) → the plan (`emit`) and
  `PLAN.scores.safetensors`, both checked, written atomically.

The calibration pool is split in two: the first `nsamples` windows are what
the scores are measured on, the next `heldout` windows judge the candidates.
Neither overlaps the evaluation pool `plancc eval` reports on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from compiler.checkpoint import CheckpointFacts, load_checkpoint_facts, weights_digest
from compiler.facts import ModelFacts, validate_facts
from compiler.parse import parse
from compiler.sidecar import WEIGHTS_KEY
from compiler.targets import ANY, TARGETS
from plangen import emit
from plangen.candidate import Candidate, original_params
from plangen.metrics import OBS
from plangen.pipeline import (
    AnalyzeError,
    Measured,
    Options,
    Outcome,
    aimed,
    calibration_line,
    calibration_windows,
    check_same_text,
    distinct,
    finite_loss,
    provenance_lines,
    say,
    scores_metadata,
    scores_path_for,
    shape_key,
    sidecar_meta,
    write_outputs,
)
from plangen.plot import PLOT_EXTRA, plot_available, plot_plan
from plangen.scores import (
    ScoreTables,
    compute_tables,
    geometry,
    read_sidecar,
)
from plangen.strategies import Budget, StrategyError, parse_layer_range
from plangen.strategies.depth import depth, layers_for_budget
from plangen.strategies.global_budget import TRUST_REGION, global_budget
from plangen.strategies.unbalanced import parse_distribution, unbalanced
from plangen.strategies.uniform import uniform

OBS_ALLOCATION = "taylor"  # ... with the widths allocated by this measured table
STRATEGIES = ("auto", "depth", "uniform", "unbalanced", "global", "flap")
ALIASES = {"best": "auto"}  # the name issue 11's default had
DEFAULT_TARGET = 0.75


def model_facts(ckpt: CheckpointFacts) -> ModelFacts:
    plan = parse(f"plan 1\n{ckpt.model_block()}").plan
    assert plan is not None and plan.model is not None
    facts, diags = validate_facts(plan.model)
    if any(d.is_error for d in diags):  # pragma: no cover - the header reader's own output
        raise AnalyzeError(f"the model block of {ckpt.model_dir} does not validate: {diags[0]}")
    return facts


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


MEMINFO = Path("/proc/meminfo")
MEMORY_CHECK_ENV = "PLANCC_NO_MEMORY_CHECK"  # set to 1: the same as --no-memory-check


def available_memory() -> int | None:
    """Bytes the kernel could give a new process without swapping: MemAvailable,
    which counts reclaimable page cache (MemFree does not, and on a machine that has
    read a few checkpoints it is a small fraction of what is usable). None: unknown."""
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit.strip() == "kB" else 1)
    except (OSError, ValueError):
        pass
    return None


def check_memory(facts_params: int, opts: Options, gradients: bool) -> None:
    """Refuse before loading when the model cannot fit the device (weights + gradients).

    An estimate, so the user can override it: --no-memory-check, or
    PLANCC_NO_MEMORY_CHECK=1 in the environment."""
    import torch

    if not opts.memory_check or os.environ.get(MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    width = 2 if opts.dtype == "bfloat16" else 4
    # Weights; with gradients also their .grad (the first-order sum) and about half
    # as much again for activations (the Fisher term is folded per unit as it comes).
    need = int(facts_params * width * (2.5 if gradients else 1.0))
    if opts.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AnalyzeError("--device cuda: no CUDA device is visible; use --device cpu")
        free, _total = torch.cuda.mem_get_info()
        where = "GPU memory free"
    else:
        available = available_memory()
        if available is None:  # not Linux: no estimate worth refusing on
            return
        free = available
        where = "memory available (MemAvailable)"
    if need > free:
        advice = "--dtype bfloat16, " if opts.dtype == "float32" else ""
        advice += "a forward-only --metric (such as wanda), " if gradients else ""
        raise AnalyzeError(
            f"the model needs about {_size(need)} on {opts.device} "
            f"({'weights, gradients and activations' if gradients else 'weights'}, "
            f"{opts.dtype}) but only {_size(free)} {where}; use {advice}a larger device, "
            f"or, if the estimate is wrong, --no-memory-check (or {MEMORY_CHECK_ENV}=1)"
        )


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---- inputs and output, checked before any work -----------------------------------------


def check_output(opts: Options) -> None:
    """-o names a plan file that can be written, and replaces one only with --force;
    the temporary files of a killed earlier run to it are removed. Run first: a bad
    output location is found in milliseconds, not after the calibration."""
    from plangen import staging

    plan = opts.output
    sidecar = scores_path_for(plan)
    for path in (plan, sidecar):
        if path.is_dir():
            raise AnalyzeError(
                f"-o {plan}: {path} is a directory; -o names the plan file to write, "
                f"such as {plan / 'plan.prn'}"
            )
    existing = [p for p in (plan, sidecar) if p.exists() or p.is_symlink()]
    if existing and not opts.force:
        raise AnalyzeError(
            f"{existing[0]} already exists; pass --force to replace the plan and its "
            "sidecar, or choose another -o"
        )
    if opts.csv is not None and opts.csv.is_dir():
        raise AnalyzeError(f"--csv {opts.csv} is a directory; name the CSV file to write")
    ancestor = plan.parent if str(plan.parent) else Path(".")
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AnalyzeError(f"-o {plan}: {ancestor} is a file, not a directory; choose another -o")
    if ancestor != plan.parent:  # created when the plan is written
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise AnalyzeError(f"-o {plan}: cannot create directories in {ancestor}")
        return
    try:
        staging.probe(plan)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AnalyzeError(
            f"-o {plan}: cannot create files in {ancestor} ({reason}); choose a writable -o"
        ) from None
    for path in (plan, sidecar):
        staging.remove_stale(path)


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position embeddings cover, when config.json says."""
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_options(opts: Options, ckpt: CheckpointFacts, facts: ModelFacts) -> None:
    """Option values this model cannot honour, refused before loading it."""
    n = facts.layers or 0
    if opts.drop is not None and not 1 <= opts.drop < n:
        raise AnalyzeError(
            f"--drop {opts.drop}: the model has {n} layers; drop between 1 and {n - 1}"
        )
    if opts.drop_frac is not None:
        count = round(opts.drop_frac * n)
        if not 1 <= count < n:
            raise AnalyzeError(
                f"--drop-frac {opts.drop_frac:g} of {n} layers is {count} layers; "
                f"it must come to between 1 and {n - 1} (or use --drop N)"
            )
    if not facts.is_moe:
        for name, value in (
            ("--drop-experts", opts.drop_experts),
            ("--shrink-experts", opts.shrink_experts),
        ):
            if value is not None:
                raise AnalyzeError(
                    f"{name}: {ckpt.model_dir} is a dense model (no routed experts); "
                    "use --target-params, --ratio or --drop"
                )
    check_target(opts.target, facts)
    if opts.plot and not plot_available():
        raise AnalyzeError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}")
    longest = max_positions(ckpt.config)
    if longest is not None and opts.seqlen > longest:
        raise AnalyzeError(
            f"--seqlen {opts.seqlen}: the model's positions go up to {longest} "
            "(max_position_embeddings); use --seqlen "
            f"{longest} or less"
        )


def check_target(target: str, facts: ModelFacts) -> None:
    """A target that cannot run this model at all, refused before any work."""
    if target == ANY:
        return
    t = TARGETS[target]
    family = facts.arch.name if facts.arch else "?"
    if family not in t.families:
        runs = [n for n, other in TARGETS.items() if family in other.families]
        raise AnalyzeError(
            f"--target {target}: {t.what} does not run the `{family}` family; "
            f"targets that do: {', '.join(runs) or 'none'} (or leave --target out)"
        )


def load_scores(path: Path, ckpt: CheckpointFacts, facts: ModelFacts) -> ScoreTables:
    """The tables of `--scores FILE`, refused unless they were measured on a model of
    this structure (fingerprint, or the layer count of older sidecars); the weights
    are compared next (`same_weights`), once the cheap checks have passed."""
    from compiler.sidecar import SidecarError

    try:
        scores = read_sidecar(path)
    except SidecarError as exc:
        raise AnalyzeError(f"--scores: {exc}") from None
    meta = sidecar_meta(scores)
    fix = f"re-run without --scores to measure {ckpt.model_dir}"
    recorded = meta.get("model_fingerprint")
    if recorded and facts.fingerprint and recorded != facts.fingerprint:
        raise AnalyzeError(
            f"--scores {path} was measured on another model (its fingerprint is {recorded}, "
            f"{ckpt.model_dir} has {facts.fingerprint}); {fix}"
        )
    depth = scores.tables.get("block_influence")
    if depth is not None and len(depth) != (facts.layers or 0):
        raise AnalyzeError(
            f"--scores {path} holds scores of {len(depth)} layers, {ckpt.model_dir} has "
            f"{facts.layers}: it was measured on another model; {fix}"
        )
    return scores.without_reconstruction()


def same_weights(path: Path, scores: ScoreTables, ckpt: CheckpointFacts, digest: str) -> None:
    """`--scores FILE` measured on the weights of `ckpt`, where the sidecar records them."""
    weights = sidecar_meta(scores).get(WEIGHTS_KEY)
    if weights and weights != digest:
        raise AnalyzeError(
            f"--scores {path} was measured on other weights ({weights}) than those of "
            f"{ckpt.model_dir} ({digest}): same shapes, another checkpoint; re-run without "
            f"--scores to measure {ckpt.model_dir}, or pass the checkpoint the scores were "
            "measured on"
        )


def adopt_calibration(opts: Options, scores: ScoreTables) -> None:
    """With --scores, the calibration the sidecar was measured with is the plan's (its
    `calibration` line) and decides which windows come after it as held-out ones."""
    cal = sidecar_meta(scores).get("calibration")
    if not isinstance(cal, dict):
        return
    if isinstance(cal.get("data"), str):
        opts.calib = cal["data"]
    for key, name in (("samples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed")):
        if isinstance(cal.get(key), int) and not isinstance(cal.get(key), bool):
            setattr(opts, name, cal[key])


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
    metric = opts.metric or default_metric(opts.strategy)
    attn = parse_layer_range(opts.attn_layers, n, "--attn-layers")
    mlp = parse_layer_range(opts.mlp_layers, n, "--mlp-layers")
    if opts.parts == "mlp":
        attn = []
    elif opts.parts == "attn":
        mlp = []
    ratio = opts.ratio
    match opts.strategy:
        case "depth":
            score = opts.metric or "block_influence"
            return [
                depth(budget, layers_for_budget(budget), score, opts.keep_last_layer, opts.split)
            ]
        case "uniform":
            return [uniform(budget, metric, attn, mlp, ratio, opts.compensate, opts.round_groups)]
        case "unbalanced":
            return [
                unbalanced(
                    budget,
                    metric,
                    opts.importance,
                    opts.allocation,
                    parse_distribution(opts.distribution),
                    opts.freeze_top,
                    opts.compensate,
                )
            ]
        case "global":
            return [
                global_budget(
                    budget,
                    metric,
                    sorted(set(attn) | set(mlp)),
                    opts.rank,
                    attention=bool(attn),
                    compensate=opts.compensate,
                    remove_empty_layers=opts.remove_empty_layers,
                    max_layer_cut=opts.max_layer_cut,
                    trust=TRUST_REGION if opts.max_layer_cut is None and opts.trust else None,
                )
            ]
        case "flap":
            return [global_budget(budget, metric, None, "score", compensate=True)]
    # auto: the strategies above with their published defaults, compensated (FLAP's
    # bias never hurt in any measurement here), and reconstructed variants, every
    # one judged on held-out loss. Each reconstructed candidate costs one walk.
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


# ---- the pipeline ---------------------------------------------------------------------


def removal_losses(
    model: Any,
    ckpt: CheckpointFacts,
    facts: ModelFacts,
    scores: ScoreTables,
    held: list,
    opts: Options,
) -> list[float]:
    """Held-out loss with each layer bypassed in turn (higher = the layer matters more)."""
    from tqdm import tqdm

    from plangen.heldout import mean_loss
    from plangen.surgery import applied

    out = []
    for i in tqdm(range(facts.layers or 0), desc="removal", disable=not opts.progress, leave=False):
        with applied(model, ckpt.arch, facts, Candidate("depth", "", drop=(i,)), scores):
            out.append(mean_loss(model, held, opts.batch_size, opts.device))
    return out


def run(opts: Options) -> Outcome:
    import torch

    from executor.loader import load
    from plangen.calibrate import collect
    from plangen.heldout import judge, mean_loss
    from plangen.metrics.registry import WIDTH_METRICS

    started = time.perf_counter()
    phases: dict[str, float] = {}
    opts.strategy = ALIASES.get(opts.strategy, opts.strategy)
    if opts.compensate and opts.reconstruct:
        raise AnalyzeError(
            "--compensate and --reconstruct: the reconstruction already fits what the "
            "removed channels contributed; choose one"
        )
    if opts.strategy not in STRATEGIES:
        raise AnalyzeError(f"unknown --strategy {opts.strategy!r} (one of {', '.join(STRATEGIES)})")
    check_output(opts)
    ckpt = load_checkpoint_facts(opts.model_dir)
    facts = model_facts(ckpt)
    given = None
    if opts.scores is not None:
        given = load_scores(opts.scores, ckpt, facts)
        adopt_calibration(opts, given)
    check_options(opts, ckpt, facts)
    # The weights the scores are measured on, bound into the sidecar and the plan; the
    # loader reads the same bytes next (from the page cache) and the digest is memoized.
    weights = weights_digest(ckpt.model_dir, ckpt.index)
    if given is not None and opts.scores is not None:
        same_weights(opts.scores, given, ckpt, weights)
    if facts.is_moe:
        from plangen.analyze_moe import run_moe  # imports torch: only when needed

        return run_moe(opts, ckpt, facts, started, weights, given)
    metrics = needed_metrics(opts)
    for m in metrics:
        if m not in WIDTH_METRICS:
            raise AnalyzeError(f"unknown --metric {m!r} (one of {', '.join(WIDTH_METRICS)})")
    gradients = any(WIDTH_METRICS[m].needs == "gradients" for m in metrics)
    params = original_params(facts)
    check_memory(params, opts, gradients and opts.scores is None)
    cands = checked_candidates(opts, facts, given) if given is not None else None

    pools, calib_windows, held = calibration_windows(opts)
    if given is not None:
        check_same_text(opts, given, pools)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    model = load(opts.model_dir, opts.device, dtype)
    passes = 0.0
    if given is not None:
        scores = given
        say(opts, f"plangen: scores from {opts.scores} (no calibration)")
    else:
        say(
            opts,
            f"plangen: calibrating on {len(calib_windows)} x {opts.seqlen} tokens of {opts.calib}"
            + (" (forward + backward)" if gradients else ""),
        )
        phases["load"] = time.perf_counter() - started
        calib = collect(
            model,
            ckpt.arch,
            calib_windows,
            gradients=gradients,
            fisher="taylor2" in metrics,
            geom=geometry(facts),
            checkpointing=(
                opts.device.startswith("cuda") if opts.checkpointing is None else opts.checkpointing
            ),
            batch_size=opts.batch_size,
            device=opts.device,
            progress=opts.progress,
        )
        passes += 3.0 if gradients else 1.0  # backward ~ twice a forward
        phases["calibrate"] = time.perf_counter() - started - sum(phases.values())
        scores = compute_tables(model, ckpt.arch, facts, calib, metrics, opts.seed)
        phases["score"] = time.perf_counter() - started - sum(phases.values())
        del calib
        if needs_removal(opts):
            scores.tables["removal"] = np.asarray(
                removal_losses(model, ckpt, facts, scores, held, opts)
            )
            passes += (facts.layers or 0) * len(held) / len(calib_windows)
        scores.metadata = scores_metadata(opts, facts, pools.text_sha256, metrics, weights)
    if cands is None:
        cands = checked_candidates(opts, facts, scores)

    solver = _Solver(model, ckpt.arch, facts, scores, calib_windows, opts)
    mark = time.perf_counter()
    loss_before = mean_loss(model, held, opts.batch_size, opts.device)
    judged = judge(
        model, ckpt.arch, facts, scores, cands, held, opts.batch_size, opts.device, solver
    )
    phases["judge"] = time.perf_counter() - mark - solver.seconds
    measured = [Measured(j.candidate, j.candidate.params(facts), j.first, j.loss) for j in judged]
    passes += (len(held) + sum(j.windows for j in judged)) / len(calib_windows)
    finalists = [m for m in measured if m.loss is not None]
    chosen = min(finalists, key=lambda m: finite_loss(m.loss))
    why = (
        f"lowest held-out loss of {len(measured)} candidates ({len(finalists)} finalists)"
        if len(measured) > 1
        else f"--strategy {opts.strategy}"
    )

    if chosen.candidate.reconstruct:
        solved = solver(chosen.candidate)
        _attach_reconstruction(scores, solved, chosen.candidate, ckpt, facts, opts)
    if solver.seconds:
        phases["reconstruct"] = solver.seconds
        passes += solver.passes

    plan_path, sidecar = write_outputs(
        opts,
        ckpt,
        facts,
        scores,
        chosen.candidate,
        provenance_lines(opts, facts, pools.text_sha256, why, measured, loss_before),
        weights,
    )
    if opts.csv is not None:
        _write_csv(opts.csv, facts, scores, chosen.candidate)
    if opts.plot:
        plot_plan(plan_path.with_suffix(".png"), facts, scores, chosen.candidate)
    return Outcome(
        plan_path,
        sidecar,
        chosen,
        measured,
        params,
        loss_before,
        why,
        time.perf_counter() - started,
        passes,
        phases,
    )


class _Solver:
    """Sequential reconstruction of a candidate, solved once and kept for the judge and
    for the sidecar; the time and forward passes it spends are counted apart."""

    def __init__(self, model, arch, facts, scores, windows, opts: Options) -> None:
        self.model, self.arch, self.facts, self.scores = model, arch, facts, scores
        self.windows, self.opts = windows, opts
        self.cache: dict[tuple[object, ...], list] = {}
        self.seconds = 0.0
        self.passes = 0.0

    def __call__(self, cand: Candidate) -> list:
        from plangen.reconstruct import sequential

        key = shape_key(cand)
        if key not in self.cache:
            started = time.perf_counter()
            solved = sequential(
                self.model,
                self.arch,
                self.facts,
                cand,
                self.scores,
                self.windows,
                damp=self.opts.damp,
                one_shot=self.opts.one_shot,
                residual=self.opts.residual,
                batch_size=self.opts.batch_size,
                device=self.opts.device,
                progress=self.opts.progress,
            )
            self.seconds += time.perf_counter() - started
            layers = self.facts.layers or 1
            self.passes += (layers + len(solved)) / layers  # one walk plus a partial per solve
            self.cache[key] = solved
        return self.cache[key]


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


# ---- the end screen -------------------------------------------------------------------


def _ppl(loss: float | None) -> str:
    return "" if loss is None else f"{math.exp(min(loss, 50)):.2f}"


def render(out: Outcome) -> str:
    c = out.chosen
    assert c.loss is not None
    lines = [
        f"plan     {out.plan_path}",
        f"scores   {out.scores_path}",
        f"strategy {c.candidate.strategy}: {c.candidate.label}",
        f"         chosen for the {out.why}",
        f"params   {out.params_before:,} -> {c.params:,} ({c.params / out.params_before:.1%} kept)",
        f"held-out loss {out.loss_before:.4f} (ppl {math.exp(out.loss_before):.2f}) -> "
        f"{c.loss:.4f} (ppl {math.exp(c.loss):.2f})",
        "",
        *candidate_table(out),
        "",
        f"{out.seconds:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in out.phases.items())
        + f"), about {out.forward_passes:.1f} forward passes over the calibration set",
        f"next: plancc check {out.plan_path}  then  plancc apply {out.plan_path} -o OUT",
    ]
    return "\n".join(lines)


def candidate_table(out: Outcome) -> list[str]:
    """Every candidate, labels whole, finalists first: the winner is the finalist with
    the lowest perplexity on all held-out windows; the others were cut after the first
    window (their `all windows` column is empty), so the two columns are not compared."""
    width = max(len("candidate"), *(len(m.candidate.label) for m in out.considered))
    lines = [f"  {'candidate':<{width}} {'params':>6} {'ppl, first window':>17} {'ppl, all':>8}"]
    for m in sorted(out.considered, key=lambda m: (finite_loss(m.loss), finite_loss(m.first))):
        mark = "*" if m is out.chosen else " "
        lines.append(
            f"{mark} {m.candidate.label:<{width}} {m.params / out.params_before:>6.1%} "
            f"{_ppl(m.first):>17} {_ppl(m.loss):>8}"
        )
    lines.append(
        "  held-out perplexity: every candidate on the first window; the finalists (with "
        "`ppl, all`) on every window, and * marks the lowest of those, which wins; a "
        "candidate without `ppl, all` was cut after the first window"
        if any(m.loss is None for m in out.considered)
        else "  held-out perplexity on the first window and on all of them; * marks the "
        "lowest on all, which wins"
    )
    return lines


def outcome_json(out: Outcome) -> str:
    return json.dumps(
        {
            "plan": str(out.plan_path),
            "scores": str(out.scores_path),
            "strategy": out.chosen.candidate.strategy,
            "label": out.chosen.candidate.label,
            "why": out.why,
            "params_before": out.params_before,
            "params_after": out.chosen.params,
            "heldout_loss_before": out.loss_before,
            "heldout_loss_after": out.chosen.loss,
            "candidates": [
                {
                    "label": m.candidate.label,
                    "params": m.params,
                    "heldout_loss_first_window": m.first,
                    "heldout_loss": m.loss,
                }
                for m in out.considered
            ],
            "seconds": out.seconds,
            "forward_passes": out.forward_passes,
            "phases_s": out.phases,
        },
        indent=2,
    )
