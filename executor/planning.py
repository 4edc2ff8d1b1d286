"""Plan -> task list: decide every output tensor of applying a resolved plan.

`plan_job` walks the resolved plan layer by layer over the checkpoint's tensor
index. Each source tensor is copied (bytes unchanged), sliced (kept positions of
one axis, per the architecture table's spaces) or sent whole to a bundle; the
sliced-away part goes to the width bundle. Channel choice (`by magnitude` or a
sidecar table), `compensate` biases and `reconstruct` projections are computed
here, reading one tensor at a time, so that nothing is written until everything
is known.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler import geometry
from compiler.architectures import Architecture, TensorSpec
from compiler.checkpoint import (
    CheckpointFacts,
    TensorInfo,
    expected_tensors,
    tensor_mismatches,
)
from compiler.resolve import LayerPlan, ResolvedPlan
from compiler.sidecar import table_name
from executor import slicing
from executor.configs import LayerShape
from executor.experts import (
    EXPERT_FFN,
    EXPERT_GATE_UP,
    EXPERTS,
    ExpertSelection,
    expert_of,
    moe_widths,
    renumbered,
    selection_key,
)
from executor.experts import choose as choose_experts
from executor.layout import WIDTH_BUNDLE
from executor.safetensors_io import (
    SourceFiles,
    decode,
    encode,
    read_raw,
)
from executor.tasks import (
    DEFAULT_MAX_SHARD_BYTES,
    ApplyError,
    ApplyJob,
    Cut,
    FileTask,
    TensorTask,
    bundle_file,
    layer_name,
    shards,
    spec_for,
)


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
    return channel_magnitude(
        [(s, s.name) for s in arch.dense_mlp], tensors, model_dir, files, "ffn", ffn, device
    )


def channel_magnitude(
    named: list[tuple[TensorSpec, str]],
    tensors: Mapping[str, TensorInfo],
    model_dir: Path,
    files: SourceFiles,
    space: str,
    size: int,
    device: str,
) -> np.ndarray:
    """The L2 norm of each channel of `space` over the (spec, layer-relative name) tensors
    given: its rows and columns in every one of them (`gate_up` folded onto `ffn`)."""
    family = geometry.FFN_PARTS if space == "ffn" else {space: 1}
    total = np.zeros(size, dtype=np.float64)
    for spec, rel in named:
        info = tensors.get(rel)
        if info is None:
            continue
        for axis, dim in enumerate(spec.dims):
            if dim in family:
                raw = read_raw(files, model_dir / info.file, info)
                sums = slicing.axis_square_sums(raw, info.dtype, axis, device)
                total += sums.reshape(family[dim], size).sum(axis=0)
    return np.sqrt(total)


def plan_job(
    resolved: ResolvedPlan,
    ck: CheckpointFacts,
    scores_path: Path | None = None,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ApplyJob:
    """Decide every output tensor of applying `resolved` to checkpoint `ck`."""
    arch = ck.arch
    _check_layout(ck)
    model_level, per_layer = _split_by_layer(ck, len(resolved.layers))
    build = _JobBuilder(resolved, ck, Scores(scores_path), device)
    for info in model_level:
        build.a_tasks.append(TensorTask(info.name, info.dtype, info.shape, info))
        build.fate[info.name] = (info.name, None, None, "copied")
    with SourceFiles() as files, progress_layers(len(resolved.layers)) as bar:
        for layer in resolved.layers:
            bar.update(1)
            tensors = per_layer.get(layer.index, {})
            if layer.dropped:
                build.bundle_layer(layer, tensors)
            else:
                build.keep_layer(layer, tensors, files)
    files_out = build.files(max_shard_bytes, arch)
    log, added = build.log(files_out, arch)
    return ApplyJob(
        model_dir=ck.model_dir,
        files=tuple(files_out),
        selections=build.selections,
        layer_selections=build.layer_sel,
        expert_selections=build.expert_sel,
        shapes=tuple(build.shapes),
        log=log,
        added=added,
        bundles=resolved.bundles,
    )


def _check_layout(ck: CheckpointFacts) -> None:
    """Refuse a checkpoint whose tensors are not what the architecture table expects."""
    problems = [
        p
        for p in tensor_mismatches(expected_tensors(ck.arch, ck.facts), ck.index)
        if not p.startswith("unexpected")
    ]
    if problems:
        raise ApplyError(
            f"{ck.model_dir}: the checkpoint's tensors do not match the `{ck.arch.name}` layout "
            f"({len(problems)} problem(s), first: {problems[0]}); it cannot be sliced safely",
            "\n".join(problems[:20]),
        )


def _split_by_layer(
    ck: CheckpointFacts, layers: int
) -> tuple[list[TensorInfo], dict[int, dict[str, TensorInfo]]]:
    """The model-level tensors, and each layer's by layer-relative name."""
    pattern = ck.arch.layer_pattern()
    model_level: list[TensorInfo] = []
    per_layer: dict[int, dict[str, TensorInfo]] = {}
    for name, info in ck.index.items():
        m = pattern.match(name)
        if m and int(m.group(1)) < layers:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = info
        else:
            model_level.append(info)
    return model_level, per_layer


# What became of a source tensor: (A task name or None, bundle, width-bundle task or
# None, action: copied | sliced | bundled | modified | removed), the prune log's record.
Fate = tuple[str | None, str | None, TensorTask | None, str]


class _JobBuilder:
    """The task list as `plan_job` accumulates it, layer by layer."""

    def __init__(self, resolved: ResolvedPlan, ck: CheckpointFacts, scores: Scores, device: str):
        self.resolved, self.ck, self.scores, self.device = resolved, ck, scores, device
        self.geom = geometry.Geometry.of(resolved.facts)
        self.new_index = {layer.index: k for k, layer in enumerate(resolved.kept)}
        self.selections: dict[str, np.ndarray] = {}
        self.layer_sel: dict[int, geometry.LayerSelection] = {}
        self.expert_sel: dict[int, ExpertSelection] = {}
        self.a_tasks: list[TensorTask] = []
        self.side: dict[int, list[TensorTask]] = {}  # original layer -> width-bundle tasks
        self.bundle_tasks: dict[str, list[TensorTask]] = {}
        self.shapes: list[LayerShape] = []
        self.fate: dict[str, Fate] = {}
        self.added: list[tuple[int, TensorTask]] = []

    def bundle_layer(self, layer: LayerPlan, tensors: Mapping[str, TensorInfo]) -> None:
        """A dropped layer: every tensor whole, bytes untouched, into its bundle."""
        assert layer.bundle is not None, layer
        for info in tensors.values():
            task = TensorTask(info.name, info.dtype, info.shape, info)
            self.bundle_tasks.setdefault(layer.bundle, []).append(task)
            self.fate[info.name] = (None, layer.bundle, None, "bundled")

    def keep_layer(
        self, layer: LayerPlan, tensors: Mapping[str, TensorInfo], files: SourceFiles
    ) -> None:
        """A kept layer: choose its channels, then copy, cut or rebuild each tensor."""
        arch, facts, ck = self.ck.arch, self.resolved.facts, self.ck
        sel = _layer_selection(
            layer, arch, facts, tensors, ck.model_dir, files, self.scores, self.device
        )
        self.layer_sel[layer.index] = sel
        for space in geometry.SLICEABLE:
            idx = geometry.space_indices(space, sel, self.geom)
            if idx is not None:
                self.selections[f"{layer.index}.{space}"] = idx
        esel = self._expert_selection(layer, tensors, files) if layer.moe else None
        if esel is not None:
            self.selections.update(esel.selections(layer.index))
            self.expert_sel[layer.index] = esel
        narrowed = sel.groups is not None or sel.ffn is not None or esel != ExpertSelection()
        j = self.new_index[layer.index]
        for rel, info in tensors.items():
            spec = spec_for(arch, layer.moe, rel)
            if spec is None and narrowed:
                raise ApplyError(
                    f"tensor {info.name} is not in the `{arch.name}` table, so its layer "
                    "cannot be narrowed safely (add it to compiler/architectures.py)"
                )
            self._keep_tensor(layer, j, rel, info, spec, esel)
        new_biases = _compensations(
            layer, arch, facts, tensors, self.selections, ck.model_dir, files, self.scores, j
        )
        for rel, data in new_biases:
            self._add_bias(layer, j, rel, data, tensors, files)
        self.shapes.append(
            LayerShape(
                original=layer.index,
                heads=layer.heads_kept(facts),
                kv_heads=len(layer.groups_kept),
                ffn=layer.ffn.width if layer.ffn else None,
                added_biases=tuple(rel for rel, _ in new_biases if rel not in tensors),
                **(moe_widths(layer, facts) if layer.moe else {}),
            )
        )

    def _alpha(self, layer: LayerPlan) -> float:
        """`rescale`'s factor: 1 - the dropped experts' mean router probability."""
        n = self.resolved.facts.experts or 0
        name = table_name("router_prob", layer.index, "experts")
        prob = self.scores.table(name)
        if prob.shape != (n,):
            raise ApplyError(f"sidecar table {name} has shape {list(prob.shape)}, expected [{n}]")
        gone = [e for e in range(n) if e not in set(layer.experts_kept)]
        alpha = 1.0 - float(prob[gone].sum())
        if not 0.0 < alpha <= 1.0:
            raise ApplyError(
                f"layer {layer.index}: `rescale` would scale the kept experts by {alpha:.4g}; "
                f"sidecar table {name} is not a probability per expert"
            )
        return alpha

    def _expert_selection(
        self, layer: LayerPlan, tensors: Mapping[str, TensorInfo], files: SourceFiles
    ) -> ExpertSelection:
        """Which experts and channels a MoE layer keeps (`executor.experts`)."""
        arch, facts, ck = self.ck.arch, self.resolved.facts, self.ck

        def table(name: str, shape: tuple[int, ...]) -> np.ndarray:
            t = self.scores.table(name)
            if t.shape != shape:
                raise ApplyError(
                    f"sidecar table {name} has shape {list(t.shape)}, expected {list(shape)}"
                )
            return t

        def magnitude(space: str, expert: int | None) -> np.ndarray:
            named = [
                (spec, renumbered(spec, expert) if spec.per_expert else spec.name)
                for spec in arch.moe_mlp
                if space in spec.dims and spec.per_expert == (expert is not None)
            ]
            size = (facts.expert_ffn if expert is not None else facts.shared_ffn) or 0
            total = channel_magnitude(named, tensors, ck.model_dir, files, space, size, self.device)
            if expert is not None:  # the fused form: the expert's slice of each tensor
                fused = [s for s in arch.moe_mlp if s.dims[0] == EXPERTS and len(s.dims) == 3]
                total = np.sqrt(
                    total**2 + _fused_square_sums(fused, tensors, ck.model_dir, files, expert, size)
                )
            return total

        return choose_experts(
            layer,
            facts.experts or 0,
            facts.expert_ffn or 0,
            facts.shared_ffn or 0,
            table,
            magnitude,
        )

    def _keep_tensor(
        self,
        layer: LayerPlan,
        j: int,
        rel: str,
        info: TensorInfo,
        spec: TensorSpec | None,
        esel: ExpertSelection | None,
    ) -> None:
        """One tensor of a kept layer, renamed to its new index `j` (and a kept expert's
        to its new number): copied, cut (the removed part to the width bundle),
        re-solved (`reconstruct`, original whole) or, a dropped expert's, removed whole."""
        expert = expert_of(spec, rel) if spec is not None else None
        if expert is not None and esel is not None:
            if not esel.keeps(expert):
                removed = TensorTask(info.name, info.dtype, info.shape, info)
                self.side.setdefault(layer.index, []).append(removed)
                self.fate[info.name] = (None, None, removed, "removed")
                return
            assert spec is not None
            rel = renumbered(spec, esel.new_index(expert))
        cuts = _cuts(spec, layer.index, self.selections, expert, esel) if spec else ()
        shape = list(info.shape)
        for c in cuts:
            shape[c.axis] = c.kept(self.selections)
        name = layer_name(self.ck.arch, j, rel)
        task = TensorTask(name, info.dtype, tuple(shape), info, cuts)
        down = spec is not None and spec.dims in (
            ("hidden", EXPERT_FFN),
            (EXPERTS, "hidden", EXPERT_FFN),  # the fused form: every expert's down at once
        )
        if layer.experts_rescale and down:  # a kept expert's down_proj
            scale = self._alpha(layer)
            self.a_tasks.append(TensorTask(name, info.dtype, task.shape, info, cuts, scale=scale))
            keep = TensorTask(info.name, info.dtype, info.shape, info)
            self.side.setdefault(layer.index, []).append(keep)
            self.fate[info.name] = (name, None, keep, "modified")
            return
        rebuilt = _reconstructed(layer, spec, info, tuple(shape), self.scores) if spec else None
        if rebuilt is not None:  # re-solved columns from the sidecar; original kept whole
            self.a_tasks.append(TensorTask(name, info.dtype, task.shape, data=rebuilt))
            keep = TensorTask(info.name, info.dtype, info.shape, info)
            self.side.setdefault(layer.index, []).append(keep)
            self.fate[info.name] = (name, None, keep, "modified")
            return
        self.a_tasks.append(task)
        if not cuts:
            self.fate[info.name] = (name, None, None, "copied")
            return
        if len(cuts) == 1 and not cuts[0].experts:
            c = cuts[0]
            rshape = list(info.shape)
            rshape[c.axis] -= len(self.selections[c.key])
            removed = TensorTask(
                info.name, info.dtype, tuple(rshape), info, (Cut(c.axis, c.key, removed=True),)
            )
        else:  # cut along two axes, or per expert: keep the whole original
            removed = TensorTask(info.name, info.dtype, info.shape, info)
        self.side.setdefault(layer.index, []).append(removed)
        self.fate[info.name] = (name, None, removed, "sliced")

    def _add_bias(
        self,
        layer: LayerPlan,
        j: int,
        rel: str,
        data: Any,
        tensors: Mapping[str, TensorInfo],
        files: SourceFiles,
    ) -> None:
        """A `compensate` bias: added to the family's own bias (the original kept
        whole in the width bundle), or a new tensor the config must announce."""
        base = tensors.get(rel)
        weight = tensors[rel.removesuffix(".bias") + ".weight"]
        name = layer_name(self.ck.arch, j, rel)
        if base is not None:
            orig = decode(read_raw(files, self.ck.model_dir / base.file, base), base.dtype)
            data = orig.double() + data
            self.a_tasks[:] = [t for t in self.a_tasks if t.name != name]
            keep = TensorTask(base.name, base.dtype, base.shape, base)
            self.side.setdefault(layer.index, []).append(keep)
            task = TensorTask(name, base.dtype, base.shape, data=encode(data, base.dtype))
            self.a_tasks.append(task)
            self.fate[base.name] = (name, None, keep, "modified")
        else:
            shape = (weight.shape[0],)
            task = TensorTask(name, weight.dtype, shape, data=encode(data, weight.dtype))
            self.a_tasks.append(task)
            self.added.append((layer.index, task))

    def files(self, max_shard_bytes: int, arch: Architecture) -> list[FileTask]:
        """A's shards, then each bundle's per-layer files, then the width bundle's."""
        pattern = arch.layer_pattern()
        out = shards(self.a_tasks, max_shard_bytes)
        for name, tasks in sorted(self.bundle_tasks.items()):
            by_layer: dict[str, list[TensorTask]] = {}
            for t in tasks:
                m = pattern.match(t.name)
                assert m is not None
                by_layer.setdefault(bundle_file(name, int(m.group(1))), []).append(t)
            out += [FileTask(p, tuple(ts)) for p, ts in sorted(by_layer.items())]
        for index, tasks in sorted(self.side.items()):
            out.append(FileTask(bundle_file(WIDTH_BUNDLE, index), tuple(tasks)))
        return out

    def log(
        self, files_out: list[FileTask], arch: Architecture
    ) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
        """The prune log (one record per source tensor, in index order) and the
        records of the tensors `compensate` added."""
        pattern = arch.layer_pattern()
        where = {id(t): f.path for f in files_out for t in f.tensors}
        by_name = {t.name: t for f in files_out if f.path.startswith("A/") for t in f.tensors}
        log = []
        for name, info in self.ck.index.items():
            a_name, bundle, removed, action = self.fate[name]
            entry: dict[str, Any] = {
                "source": name,
                "shape": list(info.shape),
                "dtype": info.dtype,
                "action": action,
            }
            if a_name is not None:
                out = by_name[a_name]
                entry["output"] = {
                    "file": where[id(out)],
                    "name": out.name,
                    "shape": list(out.shape),
                }
            if bundle is not None:
                m = pattern.match(name)
                assert m is not None
                entry["bundle"] = bundle
                entry["bundle_file"] = bundle_file(bundle, int(m.group(1)))
            if removed is not None:
                entry["removed"] = {"file": where[id(removed)], "shape": list(removed.shape)}
                if removed.cuts:
                    entry["removed"].update(
                        axis=removed.cuts[0].axis, selection=removed.cuts[0].key, whole=False
                    )
                else:
                    entry["removed"]["whole"] = True
            log.append(entry)
        added = tuple(
            {"layer": orig, "name": t.name, "file": where[id(t)], "shape": list(t.shape)}
            for orig, t in self.added
        )
        return tuple(log), added


def _fused_square_sums(
    specs: list[TensorSpec],
    tensors: Mapping[str, TensorInfo],
    model_dir: Path,
    files: SourceFiles,
    expert: int,
    size: int,
) -> np.ndarray:
    """Per channel of one expert, the sum of squares of its rows and columns in the
    fused [experts, ...] tensors (gate and up blocks folded onto one channel)."""
    total = np.zeros(size, dtype=np.float64)
    for spec in specs:
        info = tensors.get(spec.name)
        if info is None:
            continue
        t = decode(read_raw(files, model_dir / info.file, info), info.dtype)[expert].double()
        for axis, dim in enumerate(spec.dims[1:]):
            if dim in (EXPERT_FFN, EXPERT_GATE_UP):
                other = 1 - axis
                sums = (t * t).sum(dim=other).numpy()
                total += sums.reshape(-1, size).sum(axis=0)
    return total


def _cuts(
    spec: TensorSpec,
    layer: int,
    selections: Mapping[str, np.ndarray],
    expert: int | None = None,
    esel: ExpertSelection | None = None,
) -> tuple[Cut, ...]:
    """The cut axes of one tensor: those whose space has a selection in this layer
    (`expert`: a routed expert's tensor, whose channels are its own). A fused expert
    tensor (axis 0 = experts) is cut along experts first, then per expert along its
    channel axis (`Cut.experts`, one selection per kept expert)."""
    out = []
    for axis, space in enumerate(spec.dims):
        fused = axis > 0 and spec.dims[0] == EXPERTS and space in (EXPERT_FFN, EXPERT_GATE_UP)
        if fused:
            if esel is None or esel.expert_ffn is None:
                continue
            kept = tuple(sorted(esel.expert_ffn))
            parts = 2 if space == EXPERT_GATE_UP else 1
            out.append(Cut(axis, f"{layer}.{EXPERT_FFN}", experts=kept, parts=parts))
            continue
        key = selection_key(layer, space, expert)
        if key in selections:
            out.append(Cut(axis, key))
    return tuple(out)


def _layer_selection(
    layer: LayerPlan,
    arch: Architecture,
    facts: Any,
    tensors: Mapping[str, TensorInfo],
    model_dir: Path,
    files: SourceFiles,
    scores: Scores,
    device: str,
) -> geometry.LayerSelection:
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
        ffn = geometry.top_channels(s, layer.ffn.width)
    return geometry.LayerSelection(groups=groups, ffn=ffn)


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
        assert info.shape[1] == geometry.Geometry.of(facts).size(space), (info.name, info.shape)
        removed = geometry.complement(selections[key], info.shape[1])
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


def progress_layers(total: int) -> Any:
    """Layer progress while planning (scoring channels reads weights), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="layer", desc="plan", file=sys.stderr, disable=None, leave=False)
