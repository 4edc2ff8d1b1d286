"""`plancc apply`: turn a checked plan and a checkpoint into OUT/A and OUT/bundles.

Two phases, so that nothing is written until everything is known:

1. `plan_job` walks the resolved plan and the checkpoint's tensor index and
   builds a frozen list of per-tensor tasks: every source tensor is copied
   (bytes unchanged), sliced (kept positions of one axis per the architecture
   table's spaces), or sent whole to a bundle; the sliced-away parts go to the
   width bundle `bundles/_width`. Channel choice (`by magnitude` or a sidecar
   table) is made here, reading one tensor at a time.
2. `execute` writes the files: each header first (all shapes are known), then
   the data, tensor by tensor, untouched tensors as byte-range copies.

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
                                  bundled | modified), `output` {file, name,
                                  shape} in A, `bundle`/`bundle_file`, and
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
                                  that axis} and `layers` {"L": {"groups":
                                  kept KV groups, "ffn": kept channels}}
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

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.architectures import Architecture, TensorSpec
from compiler.checkpoint import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    CheckpointFacts,
    TensorInfo,
    expected_tensors,
    load_checkpoint_facts,
    pickle_shards,
    tensor_mismatches,
)
from compiler.resolve import LayerPlan, ResolvedPlan
from compiler.sidecar import table_name
from executor import slicing
from executor.configs import LayerShape, build_config
from executor.integrity import Hasher, output_files, sha256_file
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
)
from executor.outdir import (
    OutputError,
    absolute,
    check_destination,
    describe_os_error,
    staged_output,
    staging_dir,
)
from executor.pickle_convert import convert_pickle_checkpoint
from executor.safetensors_io import (
    OutEntry,
    SourceFiles,
    TensorIOError,
    decode,
    encode,
    nbytes,
    order_for_alignment,
    pack_by_size,
    read_header_text,
    read_raw,
    shard_names,
    write_file,
)

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# Source files that are code, not weights or data: kept out of A (into
# bundles/_files) unless `--copy-remote-code`, as is config.json's `auto_map`.
REMOTE_CODE_SUFFIXES = (".py",)


class ApplyError(Exception):
    """The plan cannot be applied; nothing was written. `details`: diagnostics to print."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


# ---- the task list ------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Keep the positions `selections[key]` along `axis` (or, `removed`, the others)."""

    axis: int
    key: str
    removed: bool = False


@dataclass(frozen=True)
class TensorTask:
    """One tensor of an output file and where its bytes come from.

    `source` with no cuts: a byte-range copy. With cuts: read, cut, write.
    `data`: bytes computed while planning (a `compensate` bias, a `reconstruct`
    projection from the sidecar).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    cuts: tuple[Cut, ...] = ()
    data: bytes | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class FileTask:
    path: str  # relative to the output root, e.g. "A/model.safetensors"
    tensors: tuple[TensorTask, ...]


@dataclass(frozen=True)
class ApplyJob:
    """Everything `execute` does, decided up front."""

    model_dir: Path
    files: tuple[FileTask, ...]
    selections: Mapping[str, np.ndarray]
    layer_selections: Mapping[int, slicing.LayerSelection]
    shapes: tuple[LayerShape, ...]
    log: tuple[dict[str, Any], ...]
    added: tuple[dict[str, Any], ...]
    bundles: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)


def layer_name(arch: Architecture, index: int, rel: str) -> str:
    return arch.layer_prefix.replace("{i}", str(index)) + rel


def spec_for(arch: Architecture, moe_layer: bool, rel: str) -> TensorSpec | None:
    """The table entry of a layer-relative tensor name (`{e}` matches an expert index)."""
    for spec in arch.layer_tensors(moe_layer):
        if spec.per_expert:
            pat = re.escape(spec.name).replace(re.escape("{e}"), r"\d+")
            if re.fullmatch(pat, rel):
                return spec
        elif spec.name == rel:
            return spec
    return None


def _bundle_file(bundle: str, layer: int) -> str:
    return f"bundles/{bundle}/layer_{layer:03d}.safetensors"


def _shards(tasks: list[TensorTask], max_bytes: int) -> list[FileTask]:
    """Consecutive tasks packed into shards of at most `max_bytes` (one tensor may exceed it)."""
    groups = pack_by_size(tasks, lambda t: t.nbytes, max_bytes)
    names = shard_names(len(groups))
    return [FileTask(f"A/{n}", tuple(g)) for n, g in zip(names, groups, strict=True)]


# ---- channel choice -------------------------------------------------------------------


class Scores:
    """Reads metric tables from the plan's sidecar (opened lazily, once)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._handle: Any = None

    def table(self, name: str) -> np.ndarray:
        if self.path is None:
            raise ApplyError(f"the plan needs sidecar table `{name}` but names no scores file")
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as exc:
                raise ApplyError(f"scores sidecar {self.path} cannot be read: {exc}") from None
        if name not in self._handle.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise ApplyError(f"scores sidecar {self.path} has no table `{name}`")
        return self._handle.get_tensor(name).double().numpy()


def magnitude_scores(
    arch: Architecture,
    tensors: Mapping[str, TensorInfo],
    model_dir: Path,
    files: SourceFiles,
    ffn: int,
    device: str,
) -> np.ndarray:
    """`magnitude` of every MLP channel of one layer (see `executor.slicing`)."""
    total = np.zeros(ffn, dtype=np.float64)
    for spec in arch.dense_mlp:
        info = tensors.get(spec.name)
        if info is None:
            continue
        for axis, space in enumerate(spec.dims):
            if space in slicing.FFN_PARTS:
                raw = read_raw(files, model_dir / info.file, info)
                sums = slicing.axis_square_sums(raw, info.dtype, axis, device)
                total += slicing.fold_channels(sums, space, ffn)
    return np.sqrt(total)


def _check_moe_supported(resolved: ResolvedPlan) -> None:
    f = resolved.facts
    for layer in resolved.kept:
        if not layer.moe:
            continue
        changed = (
            len(layer.experts_kept) != (f.experts or 0)
            or (layer.expert_ffn is not None and layer.expert_ffn.width != (f.expert_ffn or 0))
            or (layer.shared_ffn is not None and layer.shared_ffn.width != (f.shared_ffn or 0))
        )
        if changed:
            raise ApplyError(
                f"layer {layer.index}: removing experts or narrowing expert MLPs is not "
                "supported by `plancc apply` yet (depth and attention plans on MoE models are)"
            )


# ---- planning --------------------------------------------------------------------------


def plan_job(
    resolved: ResolvedPlan,
    ck: CheckpointFacts,
    scores_path: Path | None = None,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ApplyJob:
    """Decide every output tensor of applying `resolved` to checkpoint `ck`."""
    arch, facts = ck.arch, resolved.facts
    _check_moe_supported(resolved)
    problems = [
        p
        for p in tensor_mismatches(expected_tensors(arch, ck.facts), ck.index)
        if not p.startswith("unexpected")
    ]
    if problems:
        raise ApplyError(
            f"{ck.model_dir}: the checkpoint's tensors do not match the `{arch.name}` layout "
            f"({len(problems)} problem(s), first: {problems[0]}); it cannot be sliced safely",
            "\n".join(problems[:20]),
        )

    pattern = arch.layer_pattern()
    model_level: list[TensorInfo] = []
    per_layer: dict[int, dict[str, TensorInfo]] = {}
    for name, info in ck.index.items():
        m = pattern.match(name)
        if m and int(m.group(1)) < len(resolved.layers):
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = info
        else:
            model_level.append(info)

    geom = slicing.Geometry.of(facts)
    scores = Scores(scores_path)
    new_index = {layer.index: k for k, layer in enumerate(resolved.kept)}
    selections: dict[str, np.ndarray] = {}
    layer_sel: dict[int, slicing.LayerSelection] = {}
    a_tasks: list[TensorTask] = [TensorTask(i.name, i.dtype, i.shape, i) for i in model_level]
    side: dict[int, list[TensorTask]] = {}
    bundle_tasks: dict[str, list[TensorTask]] = {}
    shapes: list[LayerShape] = []
    # source name -> (A task name or None, bundle, side task or None, action)
    fate: dict[str, tuple[str | None, str | None, TensorTask | None, str]] = {
        i.name: (i.name, None, None, "copied") for i in model_level
    }
    added: list[tuple[str, TensorTask]] = []

    with SourceFiles() as files, progress_layers(len(resolved.layers)) as bar:
        for layer in resolved.layers:
            bar.update(1)
            tensors = per_layer.get(layer.index, {})
            if layer.dropped:
                assert layer.bundle is not None, layer
                for info in tensors.values():
                    task = TensorTask(info.name, info.dtype, info.shape, info)
                    bundle_tasks.setdefault(layer.bundle, []).append(task)
                    fate[info.name] = (None, layer.bundle, None, "bundled")
                continue
            sel = _layer_selection(layer, arch, facts, tensors, ck.model_dir, files, scores, device)
            layer_sel[layer.index] = sel
            for space in slicing.SLICEABLE:
                idx = slicing.space_indices(space, sel, geom)
                if idx is not None:
                    selections[f"{layer.index}.{space}"] = idx
            j = new_index[layer.index]
            for rel, info in tensors.items():
                spec = spec_for(arch, layer.moe, rel)
                cuts = _cuts(spec, layer.index, selections) if spec else ()
                if spec is None and (sel.groups is not None or sel.ffn is not None):
                    raise ApplyError(
                        f"tensor {info.name} is not in the `{arch.name}` table, so its layer "
                        "cannot be narrowed safely (add it to compiler/architectures.py)"
                    )
                shape = list(info.shape)
                for c in cuts:
                    shape[c.axis] = len(selections[c.key])
                task = TensorTask(layer_name(arch, j, rel), info.dtype, tuple(shape), info, cuts)
                rebuilt = _reconstructed(layer, spec, info, tuple(shape), scores) if spec else None
                if rebuilt is not None:  # re-solved columns from the sidecar; original kept whole
                    task = TensorTask(task.name, info.dtype, task.shape, data=rebuilt)
                    a_tasks.append(task)
                    keep = TensorTask(info.name, info.dtype, info.shape, info)
                    side.setdefault(layer.index, []).append(keep)
                    fate[info.name] = (task.name, None, keep, "modified")
                    continue
                a_tasks.append(task)
                if not cuts:
                    fate[info.name] = (task.name, None, None, "copied")
                    continue
                if len(cuts) == 1:
                    c = cuts[0]
                    rshape = list(info.shape)
                    rshape[c.axis] -= len(selections[c.key])
                    removed = TensorTask(
                        info.name,
                        info.dtype,
                        tuple(rshape),
                        info,
                        (Cut(c.axis, c.key, removed=True),),
                    )
                else:  # cut along two axes: keep the whole original
                    removed = TensorTask(info.name, info.dtype, info.shape, info)
                side.setdefault(layer.index, []).append(removed)
                fate[info.name] = (task.name, None, removed, "sliced")
            new_biases = _compensations(
                layer, arch, facts, tensors, selections, ck.model_dir, files, scores, j
            )
            for rel, data in new_biases:
                base = tensors.get(rel)
                weight = tensors[rel.removesuffix(".bias") + ".weight"]
                name = layer_name(arch, j, rel)
                if base is not None:  # the family has this bias: add to it, keep the original
                    orig = decode(read_raw(files, ck.model_dir / base.file, base), base.dtype)
                    data = orig.double() + data
                    a_tasks[:] = [t for t in a_tasks if t.name != name]
                    keep = TensorTask(base.name, base.dtype, base.shape, base)
                    side.setdefault(layer.index, []).append(keep)
                    task = TensorTask(name, base.dtype, base.shape, data=encode(data, base.dtype))
                    a_tasks.append(task)
                    fate[base.name] = (name, None, keep, "modified")
                else:
                    shape = (weight.shape[0],)
                    task = TensorTask(name, weight.dtype, shape, data=encode(data, weight.dtype))
                    a_tasks.append(task)
                    added.append((f"{layer.index}", task))
            shapes.append(
                LayerShape(
                    original=layer.index,
                    heads=layer.heads_kept(facts),
                    kv_heads=len(layer.groups_kept),
                    ffn=layer.ffn.width if layer.ffn else None,
                    added_biases=tuple(rel for rel, _ in new_biases if rel not in tensors),
                )
            )

    files_out = _shards(a_tasks, max_shard_bytes)
    for name, tasks in sorted(bundle_tasks.items()):
        by_layer: dict[str, list[TensorTask]] = {}
        for t in tasks:
            m = pattern.match(t.name)
            assert m is not None
            by_layer.setdefault(_bundle_file(name, int(m.group(1))), []).append(t)
        files_out += [FileTask(p, tuple(ts)) for p, ts in sorted(by_layer.items())]
    for index, tasks in sorted(side.items()):
        files_out.append(FileTask(_bundle_file(WIDTH_BUNDLE, index), tuple(tasks)))

    where = {id(t): f.path for f in files_out for t in f.tensors}
    by_name = {t.name: t for f in files_out if f.path.startswith("A/") for t in f.tensors}
    log = []
    for name, info in ck.index.items():
        a_name, bundle, removed, action = fate[name]
        entry: dict[str, Any] = {
            "source": name,
            "shape": list(info.shape),
            "dtype": info.dtype,
            "action": action,
        }
        if a_name is not None:
            out = by_name[a_name]
            entry["output"] = {"file": where[id(out)], "name": out.name, "shape": list(out.shape)}
        if bundle is not None:
            m = pattern.match(name)
            assert m is not None
            entry["bundle"] = bundle
            entry["bundle_file"] = _bundle_file(bundle, int(m.group(1)))
        if removed is not None:
            entry["removed"] = {"file": where[id(removed)], "shape": list(removed.shape)}
            if removed.cuts:
                entry["removed"].update(
                    axis=removed.cuts[0].axis, selection=removed.cuts[0].key, whole=False
                )
            else:
                entry["removed"]["whole"] = True
        log.append(entry)
    added_log = tuple(
        {"layer": int(orig), "name": t.name, "file": where[id(t)], "shape": list(t.shape)}
        for orig, t in added
    )
    return ApplyJob(
        model_dir=ck.model_dir,
        files=tuple(files_out),
        selections=selections,
        layer_selections=layer_sel,
        shapes=tuple(shapes),
        log=tuple(log),
        added=added_log,
        bundles=resolved.bundles,
    )


def _cuts(spec: TensorSpec, layer: int, selections: Mapping[str, np.ndarray]) -> tuple[Cut, ...]:
    return tuple(
        Cut(axis, f"{layer}.{space}")
        for axis, space in enumerate(spec.dims)
        if f"{layer}.{space}" in selections
    )


def _layer_selection(
    layer: LayerPlan,
    arch: Architecture,
    facts: Any,
    tensors: Mapping[str, TensorInfo],
    model_dir: Path,
    files: SourceFiles,
    scores: Scores,
    device: str,
) -> slicing.LayerSelection:
    groups = None if len(layer.groups_kept) == (facts.kv_heads or 0) else layer.groups_kept
    ffn = None
    if layer.ffn is not None and facts.ffn and layer.ffn.width != facts.ffn:
        if layer.ffn.metric == "magnitude":
            s = magnitude_scores(arch, tensors, model_dir, files, facts.ffn, device)
        else:
            s = scores.table(table_name(layer.ffn.metric, layer.index, "mlp"))
            if s.shape != (facts.ffn,):
                raise ApplyError(
                    f"sidecar table {table_name(layer.ffn.metric, layer.index, 'mlp')} has shape "
                    f"{list(s.shape)}, expected [{facts.ffn}]"
                )
        ffn = slicing.top_channels(s, layer.ffn.width)
    return slicing.LayerSelection(groups=groups, ffn=ffn)


def _reconstructed(
    layer: LayerPlan,
    spec: TensorSpec,
    info: TensorInfo,
    shape: tuple[int, ...],
    scores: Scores,
) -> bytes | None:
    """The bytes of a re-solved output projection (`reconstruct`), or None.

    The sidecar's `reconstruct.L.attn` / `.mlp` holds the kept input columns of
    o_proj / down_proj, in increasing column order, as `plangen` solved them;
    they replace the sliced original, which goes whole to the width bundle.
    """
    part = {("hidden", "q"): "attn", ("hidden", "ffn"): "mlp"}.get(spec.dims)
    wanted = (part == "attn" and layer.attn_reconstruct) or (
        part == "mlp" and layer.ffn_reconstruct
    )
    if not wanted or not spec.name.endswith(".weight"):
        return None
    import torch

    name = table_name("reconstruct", layer.index, part)
    table = scores.table(name)
    if tuple(table.shape) != shape:
        raise ApplyError(
            f"sidecar table {name} has shape {list(table.shape)}, the kept columns of "
            f"{info.name} are {list(shape)}: the reconstruction was solved for another plan "
            "(re-solve it with `plangen reconstruct PLAN.prn`)"
        )
    return encode(torch.from_numpy(table), info.dtype)


def _compensations(
    layer: LayerPlan,
    arch: Architecture,
    facts: Any,
    tensors: Mapping[str, TensorInfo],
    selections: Mapping[str, np.ndarray],
    model_dir: Path,
    files: SourceFiles,
    scores: Scores,
    new_index: int,
) -> list[tuple[str, Any]]:
    """FLAP bias compensation: the removed inputs' mean contribution, as output biases.

    For an output projection W (hidden, n) whose input positions R are removed,
    the bias gains W[:, R] @ mean_in[R] (mean_in from the sidecar), computed in
    float64. Returns (layer-relative bias name, float64 tensor) pairs.
    """
    out: list[tuple[str, Any]] = []
    jobs = []
    if layer.attn_compensate:
        jobs.append(("q", "attn", arch.attention))
    if layer.ffn_compensate:
        jobs.append(("ffn", "mlp", arch.dense_mlp))
    for space, part, specs in jobs:
        key = f"{layer.index}.{space}"
        if key not in selections:
            continue
        spec = next((s for s in specs if s.dims == ("hidden", space)), None)
        if spec is None or spec.name not in tensors:
            raise ApplyError(f"`compensate` on layer {layer.index}: no output projection found")
        import torch

        info = tensors[spec.name]
        assert info.shape[1] == slicing.Geometry.of(facts).size(space), (info.name, info.shape)
        removed = slicing.complement(selections[key], info.shape[1])
        mean = torch.from_numpy(scores.table(table_name("mean_in", layer.index, part)))
        if tuple(mean.shape) != (info.shape[1],):
            raise ApplyError(
                f"sidecar table mean_in.{layer.index}.{part} has shape {list(mean.shape)}, "
                f"expected [{info.shape[1]}]"
            )
        # Only the removed columns are decoded (and widened to float64).
        cols = slicing.take(read_raw(files, model_dir / info.file, info), 1, removed)
        w = decode(cols, info.dtype).double()  # (hidden, len(removed))
        bias = w @ mean[torch.from_numpy(removed)]  # (hidden,)
        out.append((spec.name.removesuffix(".weight") + ".bias", bias))
    return out


# ---- execution -------------------------------------------------------------------------


def _produce(
    task: TensorTask, model_dir: Path, files: SourceFiles, selections: Mapping[str, np.ndarray]
) -> Callable[[], np.ndarray | bytes]:
    def run() -> np.ndarray | bytes:
        if task.data is not None:
            return task.data
        assert task.source is not None
        raw = read_raw(files, model_dir / task.source.file, task.source)
        for k, c in enumerate(task.cuts):
            idx = selections[c.key]
            if c.removed:
                idx = slicing.complement(idx, raw.shape[c.axis])
            out = files.array(f"cut{k % 2}", slicing.cut_shape(raw.shape, c.axis, len(idx)))
            raw = slicing.take(raw, c.axis, idx, out=out)
        assert raw.shape[:-1] == task.shape, (task.name, raw.shape, task.shape)
        return raw

    return run


def entries_for(
    tasks: tuple[TensorTask, ...],
    model_dir: Path,
    files: SourceFiles,
    selections: Mapping[str, np.ndarray],
) -> list[OutEntry]:
    """Output entries of one file, in data order."""
    out = []
    for t in tasks:
        if t.source is not None and not t.cuts and t.data is None:
            begin, end = t.source.byte_range
            out.append(
                OutEntry(t.name, t.dtype, t.shape, copy=(model_dir / t.source.file, begin, end))
            )
        else:
            out.append(
                OutEntry(
                    t.name, t.dtype, t.shape, produce=_produce(t, model_dir, files, selections)
                )
            )
    return order_for_alignment(out)


def progress_layers(total: int) -> Any:
    """Layer progress while planning (scoring channels reads weights), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="layer", desc="plan", file=sys.stderr, disable=None, leave=False)


def progress_bar(total: int, desc: str) -> Any:
    """A byte progress bar on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=None,
        leave=False,
    )


def execute(job: ApplyJob, root: Path, hasher: Hasher | None = None, desc: str = "apply") -> None:
    """Write every file of the job under `root` (each handed to `hasher` once written)."""
    with SourceFiles() as files, progress_bar(job.total_bytes, desc) as bar:
        for f in job.files:
            entries = entries_for(f.tensors, job.model_dir, files, job.selections)
            finished = hasher.follow(root / f.path) if hasher is not None else None
            write_file(root / f.path, entries, files, progress=bar.update)
            if finished is not None:
                finished()


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


# An indented JSON array of scalars. It starts with `[` and a newline, which
# no JSON string can contain, so it never matches inside a string value.
_SCALAR = r'(?:-?[0-9][0-9.eE+-]*|true|false|null|"[^"\\\[\]\n]*")'
_SCALAR_LIST = re.compile(rf"\[\n *{_SCALAR}(?:,\n *{_SCALAR})*\n *\]")


def dumps(data: Any) -> str:
    """Indented JSON with lists of scalars on one line (layer lists stay readable).

    Each collapsed list is parsed back and re-dumped, so values never change.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return _SCALAR_LIST.sub(lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False), text)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data) + "\n", encoding="utf-8")


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


@dataclass(frozen=True)
class ApplyOptions:
    """How to write the output (the command line's flags)."""

    device: str = "cpu"
    force: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_pickle: bool = False
    copy_remote_code: bool = False
    hash_source: bool = False


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
) -> ApplyResult:
    """Check `plan_path` against the checkpoint, then write OUT/A and OUT/bundles.

    Raises ApplyError (or OutputError for the output location) before writing
    anything when the plan, the checkpoint or the output location is wrong,
    and after removing everything it wrote when writing fails.
    """
    from compiler.check import check_file
    from compiler.diagnostics import render_text

    opts = ApplyOptions(device, force, max_shard_bytes, allow_pickle, copy_remote_code, hash_source)
    start = time.perf_counter()
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
    scores_path = None
    if result.plan is not None and result.plan.scores is not None:
        scores_path = Path(result.plan.scores.path)
        if not scores_path.is_absolute():
            scores_path = plan_path.parent / scores_path
    inputs = [plan_path, model_dir] + ([scores_path] if scores_path else [])
    check_destination(out, force, inputs)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ApplyError("--device cuda: no CUDA device is available")
    if not (allow_pickle and pickle_shards(model_dir)):
        return _apply_checked(plan_path, out, ck, result, scores_path, inputs, opts, start)
    # --allow-pickle on a pickle checkpoint: convert it to safetensors next to the
    # output, apply from there (same tensors, so the same fingerprint), remove it.
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
    try:
        job = plan_job(resolved, ck, scores_path, opts.device, opts.max_shard_bytes)
    except TensorIOError as exc:
        raise ApplyError(str(exc)) from None
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
            manifest = _write_metadata(
                tmp, job, ck, resolved, new, plan_path, hasher, opts, {**(source or {}), **extra}
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


def _write_metadata(
    root: Path,
    job: ApplyJob,
    ck: CheckpointFacts,
    resolved: ResolvedPlan,
    new: Any,
    plan_path: Path,
    hasher: Hasher,
    opts: ApplyOptions,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything in A besides the weights, and the bundles' metadata; the
    manifest, written last, records the sha256 of every other file."""
    from compiler.cost import loadability

    a = root / "A"
    a.mkdir(parents=True, exist_ok=True)
    fingerprint = ck.facts["fingerprint"]
    plan_sha = sha256_file(plan_path)
    write_json(a / CONFIG_NAME, new.config)
    side_files, withheld = copy_side_files(
        ck.model_dir, a, root / WITHHELD_DIR, opts.copy_remote_code
    )

    shards = [f for f in job.files if f.path.startswith("A/")]
    if len(shards) > 1:
        weight_map = {t.name: Path(f.path).name for f in shards for t in f.tensors}
        total = sum(t.nbytes for f in shards for t in f.tensors)
        write_json(
            a / SAFE_WEIGHTS_INDEX_NAME,
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )

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

    params_before = sum(int(np.prod(i.shape, dtype=np.int64)) for i in ck.index.values())
    params_after = sum(t.numel for f in shards for t in f.tensors)
    added_params = sum(int(np.prod(a["shape"])) for a in job.added)
    bundle_params: dict[str, dict[str, Any]] = {}
    for name, layers in job.bundles:
        tasks = [t for f in job.files if f.path.startswith(f"bundles/{name}/") for t in f.tensors]
        params = sum(t.numel for t in tasks)
        bundle_params[name] = {"layers": list(layers), "params": params, "tensors": len(tasks)}
        meta = {
            "format": FORMAT,
            "bundle": name,
            "layers": list(layers),
            "files": {str(i): Path(_bundle_file(name, i)).name for i in layers},
            "source_fingerprint": fingerprint,
            "plan_sha256": plan_sha,
            "params": params,
            "tensors": len(tasks),
        }
        write_json(root / "bundles" / name / BUNDLE_META, meta)
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
                "layers": {
                    str(i): s.to_json()
                    for i, s in sorted(job.layer_selections.items())
                    if s.groups is not None or s.ffn is not None
                },
                "selections": {k: [int(x) for x in v] for k, v in sorted(job.selections.items())},
            },
        )

    load = loadability(resolved)
    stock = not new.needs_loader
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
                "tensors": len(width_tasks),
                "dir": f"bundles/{WIDTH_BUNDLE}" if width_tasks else None,
            },
        },
        "added": list(job.added),
        "layers": [s.to_json() for s in job.shapes],
        "uniform": new.uniform,
        "stock_loadable": stock,
        "loader": "transformers.AutoModelForCausalLM.from_pretrained" if stock else "executor.load",
        "loadability": new.reason if not stock else load.reason,
        "copied_files": side_files,
        "withheld_files": withheld,
        "remote_code": opts.copy_remote_code,
    }
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
    return manifest
