"""What the dense (`plangen.analyze_dense`) and MoE (`plangen.analyze_moe`) rows of the
one `plangen analyze` pipeline (`plangen.analyze.run`) share.

A row of the pipeline's table is a `Kind`; one analysis in progress is a `Run`,
which every stage reads and adds to. Also here: the results (`Measured`,
`Outcome`), the calibration windows, the candidates brought inside `--target`
and told apart (`distinct`), the plan's opening comment, and the plan and its
sidecar written and checked together (`write_outputs`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.check import check_text
from compiler.checkpoint import CheckpointFacts
from compiler.corpus import TokenPools, load_text, tokenize, windows
from compiler.facts import ModelFacts
from compiler.sidecar import WEIGHTS_KEY
from compiler.targets import ANY, TARGETS
from plangen import emit
from plangen.aim import aim
from plangen.candidate import Candidate
from plangen.memory import IN_MEMORY, Placement
from plangen.options import Options
from plangen.scores import ScoreTables, metadata_json, write_sidecar
from plangen.strategies import Budget

if TYPE_CHECKING:  # torch is imported by the stages that load the model, not here
    import torch

    from executor.layerwise import LayerWalk
    from plangen.reconstruct import SharedGrams


class AnalyzeError(Exception):
    """The analysis cannot run as asked; the message says why and what to do."""


@dataclass
class Measured:
    candidate: Candidate
    params: int
    first: float  # held-out loss on the first round's windows
    loss: float | None  # on every held-out window; None: cut after the first round


@dataclass
class Outcome:
    plan_path: Path
    scores_path: Path
    chosen: Measured
    considered: list[Measured]
    params_before: int
    loss_before: float
    why: str
    seconds: float
    forward_passes: float  # calibration-set forward-pass equivalents spent
    phases: dict[str, float] = field(default_factory=dict)  # seconds per stage


Solutions = Callable[[Candidate], list]  # a candidate's reconstructed weights (`plangen.heldout`)


@dataclass
class Run:
    """One analysis as it goes through the stages of `plangen.analyze.run`: what the
    first stages found (checkpoint, facts, weights digest, `--scores` tables) and what
    each later stage leaves for the next (windows, model, tables, candidates), with
    the seconds per stage and the forward passes spent so far."""

    opts: Options
    kind: Kind
    ckpt: CheckpointFacts
    facts: ModelFacts
    weights: str  # the checkpoint's weights digest, bound into the plan and sidecar
    given: ScoreTables | None  # the checked tables of --scores; None: calibrate
    started: float  # time.perf_counter() at the start
    phases: dict[str, float] = field(default_factory=dict)  # seconds per stage
    passes: float = 0.0  # calibration-set forward-pass equivalents spent
    metrics: list[str] = field(default_factory=list)  # the tables the calibration measures
    gradients: bool = False  # whether measuring them takes a backward pass
    placement: Placement = IN_MEMORY  # the whole model in memory, or layer by layer
    pools: TokenPools | None = None
    calib: list = field(default_factory=list)  # the windows the scores are measured on
    held: list = field(default_factory=list)  # the windows that judge the candidates
    model: torch.nn.Module | None = None  # None when layer by layer: see `walk`
    walk: LayerWalk | None = None  # the layer walk every stage runs the model through
    scores: ScoreTables | None = None
    cands: list[Candidate] | None = None  # made before loading when --scores allows
    solutions: Solutions | None = None  # reconstructs a candidate for the judge
    grams: SharedGrams | None = None  # the calibration's Grams for a one-shot reconstruction

    @property
    def text_sha(self) -> str:
        assert self.pools is not None  # read by `calibration_windows` before any use
        return self.pools.text_sha256


@dataclass(frozen=True)
class Kind:
    """One row of the pipeline's table: a kind of model (dense, MoE) and the stages
    that differ for it. `plangen.analyze.run` runs the shared stages between them:

      prepare      what to measure and the checks that need no weights (before any
                   window is read or the model loaded)
      measure      the calibration: score tables (not run with --scores)
      candidates   the candidate plans from the tables, inside --target
      finish       the chosen candidate before the plan is written; returns its
                   held-out loss (first round, all windows) when that changed it
      beside       files written beside the plan after it (dense: --csv, --plot)

    `lone_strategy`: a single candidate is said as `--strategy S` (dense); a MoE
    plan always says how many candidates were judged."""

    name: str
    applies: Callable[[ModelFacts], bool]
    prepare: Callable[[Run], None]
    measure: Callable[[Run], ScoreTables]
    candidates: Callable[[Run], list[Candidate]]
    finish: Callable[[Run, Candidate], tuple[float, float] | None]
    beside: Callable[[Run, Candidate, Path], None]
    lone_strategy: bool


def nothing(*_args: object) -> None:
    """A stage a row does not have."""


def scores_path_for(plan: Path) -> Path:
    name = plan.name.removesuffix(".prn")
    return plan.with_name(f"{name}.scores.safetensors")


def sidecar_meta(scores: ScoreTables) -> dict[str, Any]:
    """The sidecar's `plancc` metadata as a dict ({} when absent or not JSON)."""
    try:
        meta = json.loads(scores.metadata.get("plancc", "{}"))
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def aimed(
    cands: list[Candidate], opts: Options, facts: ModelFacts, budget: Budget | None
) -> list[Candidate]:
    """The candidates brought inside `--target`'s rules (`plangen.aim`; widths are
    rounded only where a dense `budget` is given); those that cannot be are left
    out, and none left is an error that gives every reason."""
    if opts.target == ANY:
        return cands
    results = [(c, aim(c, opts.target, facts, budget)) for c in cands]
    kept = [r.candidate for _, r in results if r.candidate is not None]
    if not kept:
        reasons = "; ".join(f"{c.label}: {r.reason}" for c, r in results)
        raise AnalyzeError(
            f"--target {opts.target}: no candidate runs there ({reasons}); try another "
            "--strategy or --parts mlp, or leave --target out"
        )
    return distinct(kept)


def distinct(cands: list[Candidate]) -> list[Candidate]:
    """The candidates that remove different things (the first of equal ones is kept),
    dense and MoE alike (`shape_key`)."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for c in cands:
        key = shape_key(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def shape_key(c: Candidate) -> tuple[object, ...]:
    """What a candidate removes and how it treats what is left (labels aside): the
    layers, KV groups and channels, the table that picks the groups and channels (a
    MoE candidate's `width_metric`, a dense one's `metric`), compensation and
    reconstruction, and on a MoE model the experts dropped, `rescale` and the
    experts' and shared expert's widths. The router score that picked the dropped
    experts is not in it: two scores that drop the same experts are one candidate."""
    return (
        c.drop,
        tuple(sorted(c.groups_dropped.items())),
        tuple(sorted(c.mlp_width.items())),
        c.unit_metric if c.mlp_width or c.groups_dropped else None,
        c.compensate,
        c.reconstruct,
        tuple(sorted(c.experts_dropped.items())),
        c.experts_rescale,
        c.expert_width,
        c.shared_width,
    )


def say(opts: Options, text: str) -> None:
    if opts.progress:
        print(text, file=sys.stderr)


def calibration_windows(opts: Options) -> tuple[TokenPools, list, list]:
    """The corpus split into pools (`compiler.corpus`), and the calibration pool's first
    `nsamples` windows and the `heldout` ones after them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(opts.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # windows are unpadded; kept for safety
    text = load_text(opts.calib, opts.data_files, option="--calib")
    pools = TokenPools.split(tokenize(text, tokenizer), text)
    pool = windows(pools.calibration, opts.seqlen, opts.nsamples + opts.heldout)
    if len(pool) < opts.nsamples + opts.heldout:
        raise AnalyzeError(
            f"the calibration pool of {opts.calib} holds {len(pool)} windows of {opts.seqlen} "
            f"tokens; {opts.nsamples} + {opts.heldout} held out were asked: lower --nsamples or "
            "--seqlen, or use a larger corpus"
        )
    return pools, pool[: opts.nsamples], pool[opts.nsamples :]


def scores_metadata(
    opts: Options, facts: ModelFacts, text_sha: str, metrics: list[str], weights: str
) -> dict:
    """The sidecar's metadata: what was measured, on what (structure and weights), how."""
    return metadata_json(
        {
            "format": "plancc scores 1",
            "model_fingerprint": facts.fingerprint or "",
            WEIGHTS_KEY: weights,
            "calibration": {
                "data": opts.calib,
                "text_sha256": text_sha,
                "samples": opts.nsamples,
                "seqlen": opts.seqlen,
                "heldout": opts.heldout,
                "seed": opts.seed,
                "dtype": opts.dtype,
            },
            "metrics": metrics,
        }
    )


def plan_source(model_dir: Path, plan_path: Path) -> str:
    """The plan's `source`: as given when absolute; a relative one is rewritten relative
    to the plan's directory, which is how `plancc apply` reads it."""
    if model_dir.is_absolute() or str(model_dir).startswith("~"):
        return str(model_dir)
    return os.path.relpath(model_dir.resolve(), plan_path.parent.resolve())


def model_block(ckpt: CheckpointFacts, weights: str) -> str:
    """The checkpoint's model block with the `weights` digest its scores were measured on."""
    from compiler.checkpoint import format_model_block

    return format_model_block(ckpt.name, ckpt.arch.name, {**ckpt.facts, "weights": weights})


def write_outputs(
    opts: Options,
    ckpt: CheckpointFacts,
    facts: ModelFacts,
    scores: ScoreTables,
    chosen: Candidate,
    provenance: list[str],
    weights: str,
) -> tuple[Path, Path]:
    """The plan and its sidecar, each written to a temporary name, the plan checked
    against the written sidecar, then both renamed into place together (Ctrl-C held
    back for the two renames): a failure or an interrupt leaves neither half-written."""
    from plangen import staging

    plan_path = opts.output
    sidecar = scores_path_for(plan_path)
    created = staging.make_parents(plan_path)
    tmp_sidecar = staging.temp_path(sidecar)
    tmp_plan = staging.temp_path(plan_path)
    done = False
    try:
        sha = write_sidecar(tmp_sidecar, scores)

        def text_naming(sidecar_name: str) -> str:
            header = emit.Header(
                model_block=model_block(ckpt, weights),
                source=plan_source(opts.model_dir, plan_path),
                scores_file=sidecar_name,
                scores_sha256=sha,
                calibration=calibration_line(opts),
                provenance=provenance,
            )
            return emit.plan_text(chosen, header, scores, facts.ffn or 0)

        # Checked while the sidecar still has its temporary name: nothing is replaced
        # before the pair is known to be good.
        result = check_text(text_naming(tmp_sidecar.name), base_dir=plan_path.parent)
        if not result.ok:  # pragma: no cover - an emitter bug; tests check every strategy
            raise AnalyzeError(f"the generated plan does not check: {result.errors[0].message}")
        tmp_plan.write_text(text_naming(sidecar.name), encoding="utf-8")
        with staging.uninterruptible():
            staging.commit(tmp_sidecar, sidecar)
            staging.commit(tmp_plan, plan_path)
        done = True
    finally:
        for tmp in (tmp_sidecar, tmp_plan):
            tmp.unlink(missing_ok=True)
        if not done:
            staging.remove_empty(created)
    return plan_path, sidecar


def check_same_text(opts: Options, scores: ScoreTables, pools: TokenPools) -> None:
    """With --scores, the held-out windows must follow the sidecar's calibration ones
    in the same text, or the judge would see windows the scores were measured on."""
    recorded = (sidecar_meta(scores).get("calibration") or {}).get("text_sha256")
    if recorded and recorded != pools.text_sha256:
        raise AnalyzeError(
            f"--scores {opts.scores} was measured on another text than {opts.calib!r} reads "
            "now (its sha256 differs); pass the same --calib / --data-files it was measured with"
        )


def finite_loss(loss: float | None) -> float:
    return math.inf if loss is None or math.isnan(loss) else loss


def calibration_line(opts: Options) -> str:
    data = opts.calib if opts.calib in ("builtin", "wikitext2", "ptb", "c4") else f'"{opts.calib}"'
    return f"{data} samples {opts.nsamples} seqlen {opts.seqlen} seed {opts.seed}"


def provenance_lines(
    opts: Options,
    facts: ModelFacts,
    text_sha: str,
    why: str,
    measured: Sequence[Measured] = (),
    loss_before: float = math.nan,
) -> list[str]:
    """The plan's opening comment: how it was made and, when several candidates were
    judged, every one with its held-out loss (the reviewer sees what was passed over)."""
    from importlib.metadata import version

    lines = [
        "written by: plangen " + shlex.join(opts.command) if opts.command else "written by plangen",
        f"plancc {version('plancc')}; model {facts.fingerprint}",
        f"calibration text sha256:{text_sha}",
        f"strategy {opts.strategy}: {why}",
    ]
    if opts.target != ANY:
        t = TARGETS[opts.target]
        lines.append(f"target {t.name}: {t.what}; every candidate was kept inside its rules")
    if len(measured) > 1:
        lines.append(f"held-out loss of the original: {loss_before:.4f}; of each candidate")
        lines.append("(finalists on every held-out window, the lowest wins; the rest were cut")
        lines.append("after the first window, whose loss is shown):")
        for m in sorted(measured, key=lambda m: (finite_loss(m.loss), finite_loss(m.first))):
            loss = f"{m.loss:.4f}" if m.loss is not None else f"{m.first:.4f} (first window only)"
            lines.append(f"  {loss}  {m.candidate.label}")
    return lines
