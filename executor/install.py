"""Output install and metadata: the new config, side files, original headers,
bundle metadata, prune log, layers map and, written last, the manifest with the
sha256 of every other file (names and schemas in `executor.layout`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from compiler.checkpoint import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointFacts,
)
from compiler.hashing import sha256_file
from compiler.resolve import ResolvedPlan
from compiler.targets import loadability
from executor.experts import ExpertSelection
from executor.family_config import model_config
from executor.formats import GGUF_FILE, choose, gguf_writer
from executor.formats import nemotron_nas as nas
from executor.integrity import Hasher, output_files
from executor.layout import (
    BUNDLE_META,
    FORMAT,
    LAYERS_MAP,
    MANIFEST,
    ORIGINAL_CONFIG_DIR,
    ORIGINAL_HEADERS,
    PRUNE_LOG,
    WIDTH_BUNDLE,
    WIDTH_META,
    WITHHELD_DIR,
    write_json,
)
from executor.outdir import write_marker
from executor.safetensors_io import read_header_text
from executor.tasks import ApplyError, ApplyJob, ApplyOptions, bundle_file

# Source files that are code, not weights or data: kept out of A (into
# bundles/_files) unless `--copy-remote-code`, as is config.json's `auto_map`.
REMOTE_CODE_SUFFIXES = (".py",)


def copy_side_files(
    model_dir: Path, dest: Path, withheld_dir: Path, remote_code: bool = False
) -> tuple[list[str], list[str]]:
    """Tokenizer files, generation_config.json, chat template...: every top-level
    file that is not weights or config.json, copied unchanged into `dest`.

    Remote code (`*.py`) goes to `withheld_dir` instead unless `remote_code`:
    a pruned model should not carry code that `trust_remote_code` would run.
    Returns (copied, withheld) file names.
    """
    skip = {CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME}
    copied, withheld = [], []
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in skip:
            continue
        if p.name.endswith(".safetensors") or p.name.endswith(PICKLE_SUFFIXES):
            continue
        if p.name.endswith(REMOTE_CODE_SUFFIXES) and not remote_code:
            withheld_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, withheld_dir / p.name)
            withheld.append(p.name)
            continue
        shutil.copyfile(p, dest / p.name)
        copied.append(p.name)
    return copied, withheld


def write_metadata(
    root: Path,
    job: ApplyJob,
    ck: CheckpointFacts,
    resolved: ResolvedPlan,
    new: Any,
    plan_path: Path,
    hasher: Hasher,
    opts: ApplyOptions,
    source: dict[str, Any] | None = None,
    nemotron_problem: str | None = None,
) -> dict[str, Any]:
    """Everything in A besides the weights, and the bundles' metadata; the
    manifest, written last, records the sha256 of every other file.

    A's config.json is in the chosen format (`executor.formats.choose`;
    `nemotron_problem` says why the result cannot be Nemotron-NAS); `gguf`
    adds the GGUF file beside A, written from A before the manifest."""
    a = root / "A"
    a.mkdir(parents=True, exist_ok=True)
    fingerprint = ck.facts["fingerprint"]
    plan_sha = sha256_file(plan_path)
    model_format = choose(opts.model_format, not new.needs_loader, nemotron_problem)
    side_files, withheld, module_files = _install_config(root, job, ck, new, opts, model_format)

    shards = [f for f in job.files if f.path.startswith("A/")]
    _write_shard_index(a, shards)
    source_files = _copy_originals(a, ck)

    params_before = sum(int(np.prod(i.shape, dtype=np.int64)) for i in ck.index.values())
    params_after = sum(t.numel for f in shards for t in f.tensors)
    added_params = sum(int(np.prod(a["shape"])) for a in job.added)
    bundle_params = _write_bundle_metas(root, job, fingerprint, plan_sha)
    width_params, width_tensors = _write_width_meta(root, job, fingerprint, plan_sha)

    load = loadability(resolved)
    stock = not new.needs_loader and model_format != nas.LAYOUT
    gguf = _write_gguf(root, opts) if model_format == "gguf" else None
    manifest = {
        "format": FORMAT,
        "plan": {"file": plan_path.name, "sha256": plan_sha},
        "source": {
            "dir": str(ck.model_dir),
            "name": ck.name,
            "arch": ck.arch.name,
            "fingerprint": fingerprint,
            "files": source_files,
            **(source or {}),
        },
        "params": {"before": params_before, "after": params_after},
        # Parameters taken out of A (dropped layers, sliced-away channels); a bias that
        # `compensate` changed is kept whole in _width but is not removed.
        "removed_total": params_before - params_after + added_params,
        "removed": {
            "layers": [layer.index for layer in resolved.dropped],
            "bundles": bundle_params,
            "width": {
                "params": width_params,
                "tensors": width_tensors,
                "dir": f"bundles/{WIDTH_BUNDLE}" if width_tensors else None,
            },
        },
        "added": list(job.added),
        "layers": [s.to_json() for s in job.shapes],
        "uniform": new.uniform,
        "stock_loadable": stock,
        "loader": _loader(model_format, stock),
        "loadability": _loadability(model_format, stock, new, load.reason),
        "model_format": model_format,
        "module_files": module_files,
        "gguf": gguf,
        "copied_files": side_files,
        "withheld_files": withheld,
        "remote_code": opts.copy_remote_code,
    }
    _finish(root, job, resolved, hasher, manifest)
    return manifest


def _install_config(
    root: Path, job: ApplyJob, ck: CheckpointFacts, new: Any, opts: ApplyOptions, model_format: str
) -> tuple[list[str], list[str], list[str]]:
    """A's config.json in `model_format`, the side files beside it and, for the
    Nemotron-NAS layout, its modeling code: the files that make A loadable before
    any weight is looked at. Returns (copied, withheld, module files)."""
    a = root / "A"
    config = new.config
    if model_format == nas.LAYOUT:
        config = nas.decilm_config(ck.arch, model_config(new.config), list(job.shapes))
    write_json(a / CONFIG_NAME, config)
    side_files, withheld = copy_side_files(
        ck.model_dir, a, root / WITHHELD_DIR, opts.copy_remote_code
    )
    module_files = nas.install_module(a) if model_format == nas.LAYOUT else []
    return side_files, withheld, module_files


def _write_shard_index(a: Path, shards: list[Any]) -> None:
    """A's safetensors index, written only when A has more than one shard."""
    if len(shards) > 1:
        weight_map = {t.name: Path(f.path).name for f in shards for t in f.tensors}
        total = sum(t.nbytes for f in shards for t in f.tensors)
        write_json(
            a / SAFE_WEIGHTS_INDEX_NAME,
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _copy_originals(a: Path, ck: CheckpointFacts) -> list[str]:
    """The source's config, index and every shard's header text, copied into A's
    original_config/ for restore. Returns the source's weight files, sorted, for
    the manifest."""
    orig = a / ORIGINAL_CONFIG_DIR
    orig.mkdir()
    shutil.copyfile(ck.model_dir / CONFIG_NAME, orig / CONFIG_NAME)
    if (ck.model_dir / SAFE_WEIGHTS_INDEX_NAME).is_file():
        shutil.copyfile(ck.model_dir / SAFE_WEIGHTS_INDEX_NAME, orig / SAFE_WEIGHTS_INDEX_NAME)
    source_files = sorted({i.file for i in ck.index.values()})
    write_json(
        orig / ORIGINAL_HEADERS,
        {f: read_header_text(ck.model_dir / f) for f in source_files},
    )
    return source_files


def _write_bundle_metas(
    root: Path, job: ApplyJob, fingerprint: str, plan_sha: str
) -> dict[str, dict[str, Any]]:
    """bundle_meta.json for every dropped-layer bundle, tying it to its source and
    plan. Returns each bundle's layers, params and tensor count for the manifest."""
    bundle_params: dict[str, dict[str, Any]] = {}
    for name, layers in job.bundles:
        tasks = [t for f in job.files if f.path.startswith(f"bundles/{name}/") for t in f.tensors]
        params = sum(t.numel for t in tasks)
        bundle_params[name] = {"layers": list(layers), "params": params, "tensors": len(tasks)}
        meta = {
            "format": FORMAT,
            "bundle": name,
            "layers": list(layers),
            "files": {str(i): Path(bundle_file(name, i)).name for i in layers},
            "source_fingerprint": fingerprint,
            "plan_sha256": plan_sha,
            "params": params,
            "tensors": len(tasks),
        }
        write_json(root / "bundles" / name / BUNDLE_META, meta)
    return bundle_params


def _write_width_meta(
    root: Path, job: ApplyJob, fingerprint: str, plan_sha: str
) -> tuple[int, int]:
    """width_meta.json, when anything was sliced: what every narrowed layer keeps,
    so restore can put the cut channels back. Returns (params, tensors) of the
    width bundle, both 0 when there is none."""
    width_tasks = [
        t for f in job.files if f.path.startswith(f"bundles/{WIDTH_BUNDLE}/") for t in f.tensors
    ]
    width_params = sum(t.numel for t in width_tasks)
    if width_tasks:
        write_json(
            root / "bundles" / WIDTH_BUNDLE / WIDTH_META,
            {
                "format": FORMAT,
                "bundle": WIDTH_BUNDLE,
                "source_fingerprint": fingerprint,
                "plan_sha256": plan_sha,
                "params": width_params,
                "tensors": len(width_tasks),
                "layers": _width_layers(job),
                "selections": {k: [int(x) for x in v] for k, v in sorted(job.selections.items())},
            },
        )
    return width_params, len(width_tasks)


def _write_gguf(root: Path, opts: ApplyOptions) -> dict[str, Any]:
    """The GGUF file beside A, written from A's finished safetensors and config;
    the writer's refusal becomes an ApplyError. Returns the manifest's `gguf`."""
    try:
        gguf_writer()(root / "A", root / GGUF_FILE, opts.gguf_dtype, tokenizer_pre=opts.gguf_pre)
    except ValueError as exc:  # the writer's refusal: llama.cpp cannot run this result
        raise ApplyError(f"--format gguf: {exc}; nothing was written") from None
    return {"file": GGUF_FILE, "dtype": opts.gguf_dtype}


def _loadability(model_format: str, stock: bool, new: Any, stock_reason: str) -> str:
    """The manifest's `loadability`: why A loads the way `_loader` says (a nested
    conditional, kept out of the manifest's literal)."""
    return (
        "Nemotron-NAS layout: per-layer KV heads and MLP widths in `block_configs`"
        if model_format == nas.LAYOUT
        else new.reason
        if not stock
        else stock_reason
    )


def _finish(
    root: Path, job: ApplyJob, resolved: ResolvedPlan, hasher: Hasher, manifest: dict[str, Any]
) -> None:
    """The prune log and layers map, then the manifest with the sha256 of every
    file not hashed while it was written, then the marker: the closing writes,
    in the order write_metadata's docstring promises (the manifest last)."""
    a = root / "A"
    write_json(a / PRUNE_LOG, {"format": FORMAT, "tensors": list(job.log)})
    write_json(
        a / LAYERS_MAP,
        {
            "new_to_original": list(resolved.layers_map),
            "original_layers": len(resolved.layers),
        },
    )
    written = {f.path for f in job.files}
    for p in output_files(root):
        if p.relative_to(root).as_posix() not in written:
            hasher.add(p)
    manifest["files"] = hasher.result()
    write_json(a / MANIFEST, manifest)
    # The manifest's own sha256 goes into the output's marker, so restore and verify
    # notice an edited file list (a removed entry would otherwise skip a file's check).
    write_marker(root, "apply", manifest_sha256=sha256_file(a / MANIFEST))


def _loader(model_format: str, stock: bool) -> str:
    """How to load A, for the manifest and `plancc apply`'s last line."""
    if model_format == "nemotron-nas":
        return (
            "transformers.AutoModelForCausalLM.from_pretrained(A, trust_remote_code=True), "
            "vLLM (--trust-remote-code) or executor.load"
        )
    return "transformers.AutoModelForCausalLM.from_pretrained" if stock else "executor.load"


def _width_layers(job: ApplyJob) -> dict[str, dict[str, Any]]:
    """width_meta.json's `layers`: what every narrowed layer keeps (KV groups, MLP
    channels; experts and their channels, `executor.experts`)."""
    out: dict[str, dict[str, Any]] = {}
    untouched = ExpertSelection()
    for i, sel in sorted(job.layer_selections.items()):
        experts = job.expert_selections.get(i, untouched)
        if sel.groups is None and sel.ffn is None and experts == untouched:
            continue
        out[str(i)] = sel.to_json() | (experts.to_json() if experts != untouched else {})
    return out
