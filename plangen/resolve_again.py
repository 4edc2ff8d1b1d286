"""`plangen reconstruct PLAN.prn`: re-solve a plan's reconstructed weights as the plan now reads.

A reviewer may edit a plan `plangen analyze` wrote (a width, a KV group, a
layer kept). Every `reconstruct` statement at or after the edit is then stale
(`plancc check` says P124), because each layer was solved on the outputs of
the pruned layers before it. This re-runs only the reconstruction, for the
plan as written: same model, same calibration windows (the plan's
`calibration` line), same score tables; it writes a new sidecar next to the
old one (tables kept, reconstructed weights replaced, the solved-for plan
recorded) and re-pins the plan's `scores ... sha256`. Both files are replaced
atomically, and only when the result checks.

The model runs through the executor's layer walk, placed as `plangen analyze`
places it (`plangen.memory.placement`): loaded whole when it fits, otherwise, or
with `--offload [DIR]`, one decoder layer at a time read from the checkpoint, so a
plan for a model larger than memory can be re-solved where it was analyzed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compiler import ir
from compiler.check import check_text
from compiler.checkpoint import load_checkpoint_facts, weights_digest
from compiler.cli import UsageError, read_plan_text
from compiler.corpus import TokenPools, load_text, tokenize, windows
from compiler.facts import ModelFacts
from compiler.fmt import quote
from compiler.resolve import ResolvedPlan, resolve
from compiler.sidecar import WEIGHTS_KEY
from plangen import staging
from plangen.candidate import Candidate
from plangen.scores import ScoreTables, metadata_json, read_sidecar, write_sidecar

if TYPE_CHECKING:
    from compiler.checkpoint import CheckpointFacts
    from plangen.memory import Placement

# What the re-solve itself repairs: stale or missing reconstruction tables.
_REPAIRABLE = {"P124"}


class ReconstructError(Exception):
    """The plan cannot be re-solved; the message says why and what to do."""


@dataclass(frozen=True)
class Refreshed:
    plan: Path
    sidecar: Path
    solved: int  # projections re-solved
    seconds: float


def _blocking(result) -> list:
    """Errors other than the reconstruction being stale or absent."""
    out = []
    for d in result.errors:
        if d.code in _REPAIRABLE:
            continue
        if d.code in ("P120", "P122") and "reconstruct" in d.message:
            continue
        out.append(d)
    return out


def candidate_of(resolved: ResolvedPlan) -> tuple[Candidate, set[tuple[int, str]]]:
    """The plan as a `Candidate`, and the (layer, part) pairs it reconstructs."""
    facts = resolved.facts
    kv = facts.kv_heads or 0
    metrics = {lp.ffn.metric for lp in resolved.kept if lp.ffn and lp.ffn.width != facts.ffn}
    if len(metrics) > 1:
        raise ReconstructError(
            "the plan picks MLP channels by more than one metric "
            f"({', '.join(sorted(metrics))}); re-solving needs one `by METRIC` for all widths"
        )
    compensated = any(lp.attn_compensate or lp.ffn_compensate for lp in resolved.kept)
    targets = {
        (lp.index, part)
        for lp in resolved.kept
        for part, on in (("attn", lp.attn_reconstruct), ("mlp", lp.ffn_reconstruct))
        if on
    }
    if compensated and targets:
        raise ReconstructError(
            "the plan mixes `compensate` and `reconstruct` statements; re-solving supports "
            "one of them per plan (reconstruct already fits what was removed)"
        )
    cand = Candidate(
        "plan",
        "as written",
        drop=tuple(lp.index for lp in resolved.layers if lp.dropped),
        groups_dropped={
            lp.index: tuple(g for g in range(kv) if g not in lp.groups_kept)
            for lp in resolved.kept
            if len(lp.groups_kept) != kv
        },
        mlp_width={
            lp.index: lp.ffn.width for lp in resolved.kept if lp.ffn and lp.ffn.width != facts.ffn
        },
        metric=next(iter(metrics), "magnitude"),
        compensate=compensated,
        reconstruct=bool(targets),
    )
    return cand, targets


def _checked_plan(
    plan_path: Path, model_dir: Path | None
) -> tuple[str, ir.Plan, ModelFacts, Path, Path, Candidate, set[tuple[int, str]]]:
    """Read and check the plan, and refuse everything a re-solve cannot repair before
    any model is loaded: the text, plan, facts, sidecar, model dir and candidate."""
    try:
        text = read_plan_text(plan_path)
    except UsageError as exc:  # the one reader of plan files: its words, ours to raise
        raise ReconstructError(str(exc)) from None
    result = check_text(text, base_dir=plan_path.parent)
    blocking = _blocking(result)
    if blocking:
        from compiler.diagnostics import render_text

        raise ReconstructError(
            f"{plan_path} has {len(blocking)} error(s) a re-solve cannot repair; fix them "
            f"(`plancc check {plan_path}` lists them), then re-run:\n"
            + render_text(blocking, str(plan_path), text).rstrip("\n")
        )
    plan, facts = result.plan, result.facts
    assert plan is not None and facts is not None
    if plan.scores is None:
        raise ReconstructError(f"{plan_path} names no scores sidecar: nothing to re-solve from")
    if not any(
        isinstance(st, ir.AttnDropGroups | ir.MlpWidth) and st.reconstruct for st in plan.statements
    ):
        raise ReconstructError(f"{plan_path} has no `reconstruct` statement: nothing to re-solve")
    sidecar = Path(plan.scores.path)
    if not sidecar.is_absolute():
        sidecar = plan_path.parent / sidecar
    model_dir = model_dir or (Path(plan.source.path) if plan.source else None)
    if model_dir is None:
        raise ReconstructError(f"{plan_path} names no `source`: pass --model DIR")
    for dest in (plan_path, sidecar):
        _writable(dest)
    resolved = resolve(plan, facts)
    cand, targets = candidate_of(resolved)
    return text, plan, facts, sidecar, model_dir, cand, targets


def _recorded_settings(
    plan: ir.Plan, meta: dict, damp: float | None, default_damp: float
) -> tuple[dict, str, int, int, float, bool, bool]:
    """The calibration and solver settings to re-solve with: the plan's `calibration`
    line first, then what the sidecar recorded, so the re-solve repeats the first one.
    Returns (recorded calibration, data, samples, seqlen, damp, one_shot, residual)."""
    calibration = meta.get("calibration", {})
    options = dict(plan.calibration.options) if plan.calibration else {}
    data = plan.calibration.data if plan.calibration else calibration.get("data", "builtin")
    samples = int(options.get("samples", calibration.get("samples", 32)))
    seqlen = int(options.get("seqlen", calibration.get("seqlen", 512)))
    recorded = meta.get("reconstruction", {})
    damp = damp if damp is not None else recorded.get("damp", default_damp)
    one_shot = recorded.get("mode") == "one-shot"
    residual = recorded.get("mode") == "residual"
    return calibration, data, samples, seqlen, damp, one_shot, residual


def _calibration_windows(
    tokenizer, calibration: dict, data: str, data_files: list[str] | None, seqlen: int, samples: int
):
    """The calibration windows, refused unless the text is the one the scores were
    measured on (same sha256): a re-solve on other text would not match the tables."""
    corpus = load_text(data, data_files)
    pools = TokenPools.split(tokenize(corpus, tokenizer), corpus)
    if calibration.get("text_sha256") and calibration["text_sha256"] != pools.text_sha256:
        raise ReconstructError(
            f"the calibration text {data!r} is not the one the scores were measured on "
            "(its sha256 differs); pass the same --data-files"
        )
    return windows(pools.calibration, seqlen, samples)


def refresh(
    plan_path: Path,
    model_dir: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
    damp: float | None = None,
    progress: bool = True,
    data_files: list[str] | None = None,
    offload: str | None = None,
    memory_check: bool = True,
) -> Refreshed:
    """Re-solve `plan_path`'s reconstruction; rewrite its sidecar and its sha256 pin.
    `offload` and `memory_check` are analyze's --offload [DIR] and --no-memory-check."""
    import time

    from transformers import AutoTokenizer

    from plangen.analyze import model_facts
    from plangen.memory import open_walk
    from plangen.metrics import DAMP
    from plangen.pipeline import sidecar_meta
    from plangen.reconstruct import attach, sequential

    started = time.perf_counter()
    text, plan, facts, sidecar, model_dir, cand, targets = _checked_plan(plan_path, model_dir)

    old = read_sidecar(sidecar)
    meta = sidecar_meta(old)
    calibration, data, samples, seqlen, damp, one_shot, residual = _recorded_settings(
        plan, meta, damp, DAMP
    )

    ck = load_checkpoint_facts(model_dir)
    if model_facts(ck).fingerprint != facts.fingerprint and facts.fingerprint:
        raise ReconstructError(
            f"{model_dir} is not the model the plan was written for (fingerprints differ); "
            "pass --model with the checkpoint the plan's `source` names"
        )
    weights = weights_digest(ck.model_dir, ck.index)
    _same_weights(model_dir, weights, facts.weights, meta.get(WEIGHTS_KEY))
    placed = _placement(ck, device, dtype, offload, memory_check, samples * seqlen)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = _calibration_windows(tokenizer, calibration, data, data_files, seqlen, samples)
    scores = old.without_reconstruction()
    scores.metadata = metadata_json({**sidecar_meta(scores), WEIGHTS_KEY: weights})
    walk, _model = open_walk(ck, placed, device, dtype, batch_size)
    try:
        solved = sequential(
            None,  # unused: the walk carries the model
            ck.arch,
            facts,
            cand,
            scores,
            calib,
            targets=targets,
            damp=damp,
            one_shot=one_shot,
            residual=residual,
            batch_size=batch_size,
            device=device,
            progress=progress,
            walk=walk,
        )
    finally:
        walk.close()  # a state cache on disk is removed here, also on Ctrl-C
    attach(
        scores,
        solved,
        plan,
        facts,
        damp=damp,
        one_shot=one_shot,
        residual=residual,
        samples=samples,
        seqlen=seqlen,
    )

    _replace_both(plan_path, sidecar, text, plan.scores, scores)
    return Refreshed(plan_path, sidecar, len(solved), time.perf_counter() - started)


def _placement(
    ck: CheckpointFacts,
    device: str,
    dtype: str,
    offload: str | None,
    memory_check: bool,
    tokens: int,
) -> Placement:
    """Whole in memory or one decoder layer at a time, decided as `plangen analyze`
    decides (no gradients: a re-solve only runs forward), before any window is read;
    said on stderr when chosen for the user. A state directory's leftovers from a
    killed run are removed first."""
    from plangen.memory import DoesNotFit, Footprint, placement, prepared

    try:
        placed = placement(
            offload,
            memory_check,
            device,
            dtype,
            Footprint.of(ck),
            tokens,
            gradients=False,
            doing="re-solving",
            fewer=None,  # the token count is the plan's calibration, not an option here
        )
    except DoesNotFit as exc:
        raise ReconstructError(str(exc)) from None
    return prepared(placed)


def _writable(dest: Path) -> None:
    """The plan and its sidecar are rewritten in place: refuse before any work when
    their directory cannot take the new files."""
    try:
        staging.probe(dest)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ReconstructError(
            f"cannot rewrite {dest} ({reason}): reconstruct replaces the plan and its sidecar "
            f"in place; make {dest.parent} writable, or copy both files to a writable "
            "directory and re-run there"
        ) from None


def _same_weights(model_dir: Path, weights: str, stated: str | None, recorded: object) -> None:
    """The checkpoint must have the weights the plan and its sidecar were measured on:
    same shapes with other weights would re-solve on the wrong numbers."""
    for what, expected in (("the plan's `weights` line", stated), ("the sidecar", recorded)):
        if expected and expected != weights:
            raise ReconstructError(
                f"{model_dir} has other weights ({weights}) than {what} records ({expected}): "
                "same shapes, another checkpoint; pass --model with the checkpoint the plan "
                "was analyzed on, or run `plangen analyze` on this one"
            )


def _replace_both(
    plan_path: Path, sidecar: Path, text: str, pin: ir.Scores, scores: ScoreTables
) -> None:
    """Write the new sidecar and the re-pinned plan; on any failure (Ctrl-C included)
    both stay as they were. The new pair is checked before either is replaced."""
    for dest in (plan_path, sidecar):
        staging.remove_stale(dest)
    tmp_sidecar = staging.temp_path(sidecar)
    tmp_plan = staging.temp_path(plan_path)
    backup = staging.temp_path(sidecar, "old")
    try:
        sha = write_sidecar(tmp_sidecar, scores)
        trial = _rename_scores(_repin(text, pin, sha), pin, tmp_sidecar.name)
        check = check_text(trial, base_dir=plan_path.parent)
        if not check.ok:  # pragma: no cover - the re-solve's own output
            raise ReconstructError(f"the re-solved plan does not check: {check.errors[0].message}")
        new_text = _repin(text, pin, sha)
        tmp_plan.write_text(new_text, encoding="utf-8")
        with staging.uninterruptible():
            os.replace(sidecar, backup)
            try:
                staging.commit(tmp_sidecar, sidecar)
                staging.commit(tmp_plan, plan_path)
            except BaseException:
                os.replace(backup, sidecar)
                raise
        backup.unlink()
    finally:
        for tmp in (tmp_sidecar, tmp_plan):
            tmp.unlink(missing_ok=True)


def _rename_scores(text: str, pin: ir.Scores, name: str) -> str:
    """The plan text with its `scores` file name replaced (to check it against the new
    sidecar while that still has its temporary name)."""
    lines = text.splitlines(keepends=True)
    k = pin.span.line - 1
    lines[k] = lines[k].replace(quote(pin.path), quote(name), 1)
    return "".join(lines)


def _repin(text: str, scores: ir.Scores, sha: str) -> str:
    """The plan text with the `scores` line's sha256 string replaced, nothing else."""
    lines = text.splitlines(keepends=True)
    k = scores.sha_span.line - 1
    line = lines[k]
    old = scores.sha256
    at = line.find(old, scores.sha_span.col - 1)
    if at < 0:  # pragma: no cover - the span comes from the parser
        raise ReconstructError("cannot find the sha256 pin in the plan's scores line")
    prefix = "sha256:" if old.startswith("sha256:") else ""
    lines[k] = line[:at] + prefix + sha + line[at + len(old) :]
    return "".join(lines)
