"""`plangen analyze`: the one pipeline from a checkpoint to a checked plan and its sidecar.

  options resolved → output checked → checkpoint facts → --scores checked and its
  calibration adopted → option values this model cannot honour refused → weights
  digest → the row's `prepare` → in memory or layer by layer (`plangen.memory`,
  `--offload`) → calibration windows (`compiler.corpus`) → the walk every stage
  runs the model through (over the loaded model, or opened on the checkpoint)
  → the row's `measure` (skipped with --scores) → its `candidates` → held-out
  loss of each (`heldout.judge`, every candidate in one walk) → the lowest
  chosen → the row's `finish` → the plan (`emit`) and
  `PLAN.scores.safetensors`, both checked, written atomically → the row's
  `beside`.

The rows are the kinds of model, `KINDS`: dense (`plangen.analyze_dense`: layers,
KV groups, MLP channels) and mixture-of-experts (`plangen.analyze_moe`: experts);
the first whose `applies` holds runs. The stages they share are here.

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
from typing import TYPE_CHECKING, Any

from compiler.checkpoint import CheckpointFacts, load_checkpoint_facts, weights_digest
from compiler.facts import ModelFacts, validate_facts
from compiler.parse import parse
from compiler.sidecar import WEIGHTS_KEY
from compiler.targets import ANY, TARGETS
from executor.device import resolve_device
from plangen.analyze_dense import DENSE
from plangen.analyze_moe import MOE
from plangen.candidate import original_params
from plangen.options import OptionError, Options
from plangen.pipeline import (
    AnalyzeError,
    Kind,
    Measured,
    Outcome,
    Run,
    calibration_windows,
    check_same_text,
    finite_loss,
    provenance_lines,
    say,
    scores_path_for,
    sidecar_meta,
    write_outputs,
)
from plangen.plot import PLOT_EXTRA, plot_available
from plangen.scores import ScoreTables, read_sidecar

if TYPE_CHECKING:
    pass

# The pipeline's table: one row per kind of model, the first that applies runs.
KINDS: tuple[Kind, ...] = (MOE, DENSE)


def kind_of(facts: ModelFacts) -> Kind:
    return next(k for k in KINDS if k.applies(facts))


def model_facts(ckpt: CheckpointFacts) -> ModelFacts:
    plan = parse(f"plan 1\n{ckpt.model_block()}").plan
    assert plan is not None and plan.model is not None
    facts, diags = validate_facts(plan.model)
    if any(d.is_error for d in diags):  # pragma: no cover - the header reader's own output
        raise AnalyzeError(f"the model block of {ckpt.model_dir} does not validate: {diags[0]}")
    return facts


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
    from executor import distributed

    if opts.shard_layers and not distributed.launched():
        raise AnalyzeError(
            "--shard-layers shards each decoder layer across torchrun's processes: run "
            "`torchrun --nproc-per-node N -m plangen analyze ... --shard-layers`, or "
            "leave it out (one process holds each layer whole)"
        )
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


def adopt_calibration(opts: Options, scores: ScoreTables) -> Options:
    """With --scores, the calibration the sidecar was measured with is the plan's (its
    `calibration` line) and decides which windows come after it as held-out ones: the
    options with the sidecar's text, samples, seqlen and seed."""
    cal = sidecar_meta(scores).get("calibration")
    if not isinstance(cal, dict):
        return opts
    adopted: dict[str, Any] = {}
    if isinstance(cal.get("data"), str):
        adopted["calib"] = cal["data"]
    for key, name in (("samples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed")):
        if isinstance(cal.get(key), int) and not isinstance(cal.get(key), bool):
            adopted[name] = cal[key]
    return dataclasses.replace(opts, **adopted)


# ---- the pipeline ---------------------------------------------------------------------


def run(opts: Options) -> Outcome:
    """Analyze the checkpoint of `opts` and write its plan and sidecar.

    Under torchrun (`executor.distributed.launched`) the processes join one group for
    the run: each walks its share of the calibration and held-out batches, the sums
    over batches are combined in global batch order (the plan and sidecar are the
    single process's, byte for byte), and only rank 0 writes and prints."""
    from executor import distributed

    if not distributed.launched():
        return _run(opts)
    shard, device = distributed.start(resolve_device(opts.device))
    quiet = opts.quiet or shard.rank != 0
    try:
        return _run(dataclasses.replace(opts, device=device, quiet=quiet))
    finally:
        distributed.stop()


def lead() -> bool:
    """Whether this process writes and prints: the only one, or torchrun's rank 0."""
    from executor import distributed

    return not distributed.launched() or os.environ.get("RANK", "0") == "0"


def _run(opts: Options) -> Outcome:
    started = time.perf_counter()
    r = _checked(opts, started)
    r.kind.prepare(r)
    _place(r)
    _read_windows(r)
    try:
        return _analyzed(r)
    finally:
        if r.walk is not None:
            r.walk.close()  # a state cache on disk is removed here, also on Ctrl-C


def _analyzed(r: Run) -> Outcome:
    """The stages that run the model: load, measure, candidates, judge, finish, write."""
    _load(r)
    if r.given is not None:
        r.scores = r.given
        say(r.opts, f"plangen: scores from {r.opts.scores} (no calibration)")
    else:
        r.scores = r.kind.measure(r)
    r.cands = r.kind.candidates(r)
    measured, loss_before = _judged(r)
    chosen, why = _choice(r, measured)
    again = r.kind.finish(r, chosen.candidate)
    if again is not None:  # re-solved after the judge: measured again, as judged
        new = dataclasses.replace(chosen, first=again[0], loss=again[1])
        measured = [new if m is chosen else m for m in measured]
        chosen = new
        why += (
            f"; reconstructed candidates judged on one-shot solves, the chosen one "
            f"re-solved ({r.opts.reconstruct_mode})"
        )
    provenance = provenance_lines(r.opts, r.facts, r.text_sha, why, measured, loss_before)
    plan_path, sidecar = r.opts.output, scores_path_for(r.opts.output)
    if lead():  # under torchrun, every rank has the same outcome; rank 0 writes it
        write_outputs(r.opts, r.ckpt, r.facts, r.scores, chosen.candidate, provenance, r.weights)
        r.kind.beside(r, chosen.candidate, plan_path)
    return Outcome(
        plan_path,
        sidecar,
        chosen,
        measured,
        original_params(r.facts),
        loss_before,
        why,
        time.perf_counter() - r.started,
        r.passes,
        r.phases,
    )


def _checked(opts: Options, started: float) -> Run:
    """Everything that is checked before a window is read: the options, the output,
    the checkpoint and, with --scores, the sidecar (whose calibration becomes the
    plan's); the weights digest is taken here, bound into the sidecar and the plan."""
    try:
        opts = opts.resolved()
    except OptionError as exc:
        raise AnalyzeError(str(exc)) from None
    check_output(opts)
    ckpt = load_checkpoint_facts(opts.model_dir)
    facts = model_facts(ckpt)
    given = None
    if opts.scores is not None:
        given = load_scores(opts.scores, ckpt, facts)
        opts = adopt_calibration(opts, given)
    check_options(opts, ckpt, facts)
    # The loader reads the same bytes next (from the page cache); the digest is memoized.
    weights = weights_digest(ckpt.model_dir, ckpt.index)
    if given is not None and opts.scores is not None:
        same_weights(opts.scores, given, ckpt, weights)
    return Run(opts, kind_of(facts), ckpt, facts, weights, given, started)


def _read_windows(r: Run) -> None:
    """The calibration windows and the held-out ones after them; with --scores, in the
    text the sidecar was measured on."""
    r.pools, r.calib, r.held = calibration_windows(r.opts)
    if r.given is not None:
        check_same_text(r.opts, r.given, r.pools)


def _place(r: Run) -> None:
    """Whole in memory or one decoder layer at a time (`plangen.memory.placement`),
    decided before any window is read; said on stderr when chosen for the user."""
    from executor import distributed
    from plangen.memory import DoesNotFit, Footprint, placement, prepared

    assert r.opts.device is not None  # resolved
    shard = distributed.current()
    try:
        placed = placement(
            r.opts.offload,
            r.opts.memory_check,
            r.opts.device,
            r.opts.dtype,
            Footprint.of(r.ckpt),
            r.opts.nsamples * r.opts.seqlen,
            r.gradients,
            shard=r.opts.shard_layers,
            world=shard.world if shard is not None else 1,
        )
    except DoesNotFit as exc:
        raise AnalyzeError(str(exc)) from None
    r.placement = prepared(placed, tell=lead())


def _load(r: Run) -> None:
    """The walk every stage runs the model through: over the loaded model (every layer
    resident), or opened on the checkpoint (each layer read when reached, then freed)."""
    from plangen.memory import open_walk

    opts = r.opts
    assert opts.device is not None  # resolved
    r.walk, r.model = open_walk(r.ckpt, r.placement, opts.device, opts.dtype, opts.batch_size)
    r.phases["load"] = time.perf_counter() - r.started


def _judged(r: Run) -> tuple[list[Measured], float]:
    """Every candidate's held-out loss (successive halving, `heldout.judge`), and the
    original's from the same walks (the run's: each layer loaded once per round serves
    every candidate); reconstruction for the judge is counted apart (`Run.solutions`)."""
    from plangen.heldout import judge

    assert r.scores is not None and r.cands is not None and r.walk is not None
    mark = time.perf_counter()
    judged, loss_before = judge(r.walk, r.facts, r.scores, r.cands, r.held, r.solutions)
    solving = r.solutions.seconds if r.solutions is not None else 0.0
    r.phases["judge"] = time.perf_counter() - mark - solving
    r.passes += (len(r.held) + sum(j.windows for j in judged)) / len(r.calib)
    measured = [Measured(j.candidate, j.candidate.params(r.facts), j.first, j.loss) for j in judged]
    return measured, loss_before


def _choice(r: Run, measured: list[Measured]) -> tuple[Measured, str]:
    """The finalist with the lowest held-out loss, and why it is the plan."""
    finalists = [m for m in measured if m.loss is not None]
    chosen = min(finalists, key=lambda m: finite_loss(m.loss))
    if len(measured) == 1 and r.kind.lone_strategy:
        return chosen, f"--strategy {r.opts.strategy}"
    return (
        chosen,
        f"lowest held-out loss of {len(measured)} candidates ({len(finalists)} finalists)",
    )


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
