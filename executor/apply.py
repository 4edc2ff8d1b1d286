"""`plancc apply`: turn a checked plan and a checkpoint into OUT/A and OUT/bundles.

Three stages, so that nothing is written until everything is known, each a
module that shares only the task list (`executor.tasks`) with the others:

1. `executor.planning.plan_job` walks the resolved plan and the checkpoint's
   tensor index and builds a frozen list of per-tensor tasks: every source
   tensor is copied (bytes unchanged), sliced (kept positions of one axis per
   the architecture table's spaces), or sent whole to a bundle; the sliced-away
   parts go to the width bundle `bundles/_width`. Channel choice (`by
   magnitude` or a sidecar table) is made here, reading one tensor at a time.
2. `executor.execute` writes the files: each header first (all shapes are
   known), then the data, tensor by tensor, untouched tensors as byte-range
   copies.
3. `executor.install` writes the config, side files and metadata around them,
   the manifest last.

Output layout (a contract: `executor.restore` and `executor.load` read it)

  OUT/A/config.json               the new config (`executor.configs`; per-layer
                                  widths under the `plancc` key when one config
                                  cannot describe the model)
  OUT/A/model.safetensors         or model-0000N-of-0000M.safetensors + index
  OUT/A/<tokenizer files, generation_config.json, chat template...>  copied
  OUT/A/manifest.json             plan file name and sha256; source dir, arch,
                                  fingerprint and shard names; params before /
                                  after; removed_total (parameters taken out of
                                  A) and per bundle (layers, params, tensors);
                                  the width bundle's size; tensors `compensate`
                                  added; every kept layer's widths; uniform,
                                  stock_loadable, loader and why; copied and
                                  withheld side files; `files`: the sha256 of
                                  every other file under OUT (written last)
  OUT/A/prune_log.json            one record per source tensor: source name,
                                  shape, dtype, action (copied | sliced |
                                  bundled | modified | removed: a dropped
                                  expert's tensor, whole in _width),
                                  `output` {file, name, shape} in A,
                                  `bundle`/`bundle_file`, and
                                  `removed` {file, shape, axis, selection,
                                  whole} for the part kept in _width
  OUT/A/layers_map.json           {"new_to_original": [...], "original_layers": N}
  OUT/A/original_config/          config.json (and the shard index) byte for
                                  byte, plus safetensors_headers.json: every
                                  source file's header text, so restore can
                                  rebuild the files themselves
  OUT/bundles/<NAME>/             bundle_meta.json {bundle, layers, files,
                                  source_fingerprint, plan_sha256, params,
                                  tensors} and layer_NNN.safetensors (NNN =
                                  original index) with the layer's tensors under
                                  their ORIGINAL names, bytes untouched
  OUT/bundles/_width/             the sliced-away channels of kept layers:
                                  layer_NNN.safetensors holds, under the
                                  original tensor name, the removed positions
                                  of the cut axis in increasing order (a tensor
                                  cut twice, a bias `compensate` changed, or an
                                  output projection `reconstruct` re-solved, is
                                  kept whole); width_meta.json has
                                  `selections` {"L.space": kept positions of
                                  that axis; "L.experts", "L.expert_ffn.E",
                                  "L.shared_ffn" in MoE layers} and `layers`
                                  {"L": {"groups": kept KV groups, "ffn": kept
                                  channels; "experts", "expert_ffn",
                                  "shared_ffn" in MoE layers}}; a dropped
                                  expert's tensors are kept whole
  OUT/bundles/_files/             the source's remote code (`*.py`), kept out
                                  of A unless --copy-remote-code
  OUT/.plancc-output.json         the marker (`executor.outdir`)

A + every bundle + _width therefore rebuild the original exactly: each cut
tensor is the interleaving of A's kept positions and _width's removed ones.

Everything is written under a staging directory next to OUT and renamed
into place at the end (`executor.outdir`): an interrupted run leaves no OUT
that looks whole, and the names and schemas above live in `executor.layout`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.checkpoint import (
    CheckpointError,
    CheckpointFacts,
    load_checkpoint_facts,
    pickle_shards,
    weights_digest,
)
from compiler.targets import verdict
from executor.configs import build_config
from executor.execute import execute
from executor.install import write_metadata
from executor.integrity import Hasher
from executor.outdir import (
    OutputError,
    absolute,
    check_destination,
    describe_os_error,
    staged_output,
    staging_dir,
)
from executor.pickle_convert import convert_pickle_checkpoint
from executor.planning import plan_job
from executor.safetensors_io import TensorIOError
from executor.tasks import DEFAULT_MAX_SHARD_BYTES, ApplyError, ApplyOptions

# ---- the whole command ------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyResult:
    out: Path
    seconds: float  # the whole command, imports and checks included
    write_seconds: float  # writing the tensors (the part that scales with the model)
    bytes_written: int
    params_before: int
    params_after: int
    loader: str
    manifest: dict[str, Any]


def resolve_model_dir(plan_path: Path, source: str | None, model: Path | None) -> Path:
    """--model, else the plan's `source` (~ expanded, relative to the plan file)."""
    if model is not None:
        return model
    if source is None:
        raise ApplyError(
            f"{plan_path}: the plan has no `source` line; pass the checkpoint with --model DIR"
        )
    p = Path(os.path.expanduser(source))
    return p if p.is_absolute() else plan_path.parent / p


def apply_plan(
    plan_path: Path,
    out: Path,
    model: Path | None = None,
    device: str = "cpu",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    warn: Callable[[str], None] | None = None,
    copy_remote_code: bool = False,
    hash_source: bool = False,
    model_format: str | None = None,
    gguf_dtype: str = "f16",
    gguf_pre: str | None = None,
) -> ApplyResult:
    """Check `plan_path` against the checkpoint, then write OUT/A and OUT/bundles.

    Raises ApplyError (or OutputError for the output location) before writing
    anything when the plan, the checkpoint or the output location is wrong,
    and after removing everything it wrote when writing fails.
    """
    opts = ApplyOptions(
        device,
        force,
        max_shard_bytes,
        allow_pickle,
        copy_remote_code,
        hash_source,
        model_format,
        gguf_dtype,
        gguf_pre,
    )
    start = time.perf_counter()
    model_dir, ck, result = _check_plan(plan_path, model, allow_pickle, warn)
    scores_path = _scores_path(plan_path, result)
    inputs = [plan_path, model_dir] + ([scores_path] if scores_path else [])
    check_destination(out, force, inputs)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ApplyError("--device cuda: no CUDA device is available")
    if not (allow_pickle and pickle_shards(model_dir)):
        return _apply_checked(plan_path, out, ck, result, scores_path, inputs, opts, start)
    return _apply_pickle(plan_path, out, model_dir, ck, result, scores_path, inputs, opts, start)


def _check_plan(
    plan_path: Path,
    model: Path | None,
    allow_pickle: bool,
    warn: Callable[[str], None] | None,
) -> tuple[Path, CheckpointFacts, Any]:
    """The plan checked twice: alone (it must parse before its `source` names the
    checkpoint), then against the checkpoint's facts. Returns (checkpoint
    directory, its facts, the second check's result); warnings go to `warn`."""
    from compiler.check import check_file
    from compiler.diagnostics import render_text

    try:
        first = check_file(plan_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ApplyError(f"{plan_path}: cannot read the plan ({exc})") from None
    if first.plan is None or first.plan.model is None:
        raise ApplyError(
            f"{plan_path}: the plan does not parse; `plancc check {plan_path}` says why",
            render_text(first.errors, str(plan_path), first.source),
        )
    model_dir = resolve_model_dir(
        plan_path, first.plan.source.path if first.plan.source else None, model
    )
    try:
        ck = load_checkpoint_facts(model_dir, allow_pickle=allow_pickle)
    except CheckpointError as exc:
        raise ApplyError(str(exc)) from None
    result = check_file(plan_path, checkpoint={"arch": ck.arch.name, **ck.facts})
    if result.errors or result.resolved is None:
        raise ApplyError(
            f"{plan_path}: the plan does not fit the checkpoint {model_dir} "
            f"({len(result.errors)} error(s)); nothing was written",
            render_text(list(result.diagnostics), str(plan_path), result.source),
        )
    if warn is not None and result.diagnostics:
        warn(render_text(list(result.diagnostics), str(plan_path), result.source))
    return model_dir, ck, result


def _scores_path(plan_path: Path, result: Any) -> Path | None:
    """The plan's scores sidecar, relative to the plan file; an input that the
    output must not overwrite, hence found before the destination is checked."""
    scores_path = None
    if result.plan is not None and result.plan.scores is not None:
        scores_path = Path(result.plan.scores.path)
        if not scores_path.is_absolute():
            scores_path = plan_path.parent / scores_path
    return scores_path


def _apply_pickle(
    plan_path: Path,
    out: Path,
    model_dir: Path,
    ck: CheckpointFacts,
    result: Any,
    scores_path: Path | None,
    inputs: list[Path],
    opts: ApplyOptions,
    start: float,
) -> ApplyResult:
    """--allow-pickle on a pickle checkpoint: convert it to safetensors next to the
    output, apply from there (same tensors, so the same fingerprint), remove it;
    the source recorded in the manifest is still the pickle checkpoint."""
    try:
        out = absolute(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with staging_dir(out, "pickle", "apply") as converted:
            try:
                convert_pickle_checkpoint(model_dir, converted)
                new_ck = load_checkpoint_facts(converted)
            except CheckpointError as exc:
                raise ApplyError(str(exc)) from None
            if new_ck.facts["fingerprint"] != ck.facts["fingerprint"]:
                raise ApplyError(
                    f"{model_dir}: the safetensors conversion of the pickle checkpoint has "
                    "another fingerprint than the pickle files; nothing was written"
                )
            source = {
                "dir": str(model_dir),
                "name": ck.name,
                "pickle_files": sorted({i.file for i in ck.index.values()}),
            }
            try:
                return _apply_checked(
                    plan_path, out, new_ck, result, scores_path, inputs, opts, start, source
                )
            finally:
                shutil.rmtree(converted, ignore_errors=True)
    except OSError as exc:
        raise OutputError(describe_os_error("cannot convert the pickle checkpoint", exc)) from None


def verify_weights(ck: CheckpointFacts, stated: str | None, shown: object) -> None:
    """A plan that states `weights` (plangen writes it: its scores were measured on those
    weights) applies only to a checkpoint with exactly those weights. Checked before
    anything is written; the digest (`weights_digest`) reads every weight once, which
    also warms the page cache for the copy, and is memoized for the next run."""
    if not stated:
        return
    try:
        have = weights_digest(ck.model_dir, ck.index)
    except CheckpointError as exc:
        raise ApplyError(str(exc)) from None
    if have != stated:
        raise ApplyError(
            f"{shown}: its weights ({have}) are not the ones the plan was measured on "
            f"(`weights` {stated}): same shapes, another checkpoint; nothing was written. "
            "Apply the plan to the checkpoint it was analyzed on, run `plangen analyze` on "
            "this one, or delete the plan's `weights` line to apply its decisions to these "
            "weights anyway"
        )


def format_problem(
    plan_path: Path, ck: CheckpointFacts, job: Any, resolved: Any, requested: str | None
) -> str | None:
    """Why the result cannot be written as Nemotron-NAS (None: it can). An explicit
    `--format` the result cannot take is refused here, before anything is written."""
    from executor.formats import gguf_writer
    from executor.formats.nemotron_nas import nemotron_nas_problem

    if requested == "gguf":
        try:
            gguf_writer()
        except ImportError as exc:
            raise ApplyError(f"--format gguf: {exc}; nothing was written") from None
        from executor.formats.gguf import gguf_problems

        judged = verdict(resolved, "llamacpp", format_only=True)
        problems = [_with_help(judged)] if not judged.runs else []
        problems += [str(p) for p in gguf_problems(ck.config, ck.index, ck.model_dir)]
        if problems:
            raise ApplyError(
                f"{plan_path}: --format gguf: {'; '.join(problems)}; nothing was written"
            )
        return None
    if requested == "hf":
        return None
    # The writer's own words first (they name the fix for its layout); the target
    # table's verdict backs them (one table decides `check --target` and this).
    judged = verdict(resolved, "vllm", format_only=True)
    problem = nemotron_nas_problem(ck.arch, ck.config, list(job.shapes))
    problem = problem or (_with_help(judged) if not judged.runs else None)
    if problem is not None and requested == "nemotron-nas":
        raise ApplyError(f"{plan_path}: --format nemotron-nas: {problem}; nothing was written")
    return problem


def _with_help(judged: Any) -> str:
    """A target verdict's first reason with its fix, for a one-line refusal."""
    first = judged.diagnostics[0] if judged.diagnostics else None
    return f"{judged.reason} ({first.help})" if first is not None and first.help else judged.reason


def _apply_checked(
    plan_path: Path,
    out: Path,
    ck: CheckpointFacts,
    result: Any,
    scores_path: Path | None,
    inputs: list[Path],
    opts: ApplyOptions,
    start: float,
    source: dict[str, Any] | None = None,
) -> ApplyResult:
    """Write OUT for a plan already checked against `ck`.

    `source` overrides the manifest's `source` dir and name (a pickle checkpoint
    converted into a temporary `ck.model_dir`) and records its pickle files.
    """
    resolved = result.resolved
    verify_weights(ck, result.facts.weights, (source or {}).get("dir", ck.model_dir))
    try:
        job = plan_job(resolved, ck, scores_path, opts.device, opts.max_shard_bytes)
    except TensorIOError as exc:
        raise ApplyError(str(exc)) from None
    nemotron_problem = format_problem(plan_path, ck, job, resolved, opts.model_format)
    with staged_output(out, "apply", opts.force, inputs) as tmp:
        hasher = Hasher(tmp)
        source_hasher = Hasher(ck.model_dir) if opts.hash_source else None
        try:
            if source_hasher is not None:
                for f in sorted({i.file for i in ck.index.values()}):
                    source_hasher.add(ck.model_dir / f)
            # The new config is validated by building transformers' config class,
            # whose import (torch included) takes seconds: it runs while the data
            # is copied (the copies release the GIL), not before.
            with ThreadPoolExecutor(max_workers=1) as pool:
                future = pool.submit(
                    build_config,
                    ck.config,
                    ck.arch,
                    ck.facts,
                    list(job.shapes),
                    opts.copy_remote_code,
                )
                t0 = time.perf_counter()
                try:
                    execute(job, tmp, hasher)
                except TensorIOError as exc:
                    raise ApplyError(str(exc)) from None
                write_seconds = time.perf_counter() - t0
                new = future.result()
            extra = {"sha256": source_hasher.result()} if source_hasher is not None else {}
            manifest = write_metadata(
                tmp,
                job,
                ck,
                resolved,
                new,
                plan_path,
                hasher,
                opts,
                {**(source or {}), **extra},
                nemotron_problem,
            )
        finally:
            hasher.close()
            if source_hasher is not None:
                source_hasher.close()
    return ApplyResult(
        out=out,
        seconds=time.perf_counter() - start,
        write_seconds=write_seconds,
        bytes_written=job.total_bytes,
        params_before=manifest["params"]["before"],
        params_after=manifest["params"]["after"],
        loader=manifest["loader"],
        manifest=manifest,
    )
