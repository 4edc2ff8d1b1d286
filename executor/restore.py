"""`plancc restore`: put removed layers (and channels) back from the bundles.

`--upto NAME` restores the bundles in name order up to and including NAME
(`--upto B`: A + B; `--upto C`: A + B + C): the result has those layers back
in their original places, later bundles still removed, renumbered and
loadable (with `executor.load` when its layers differ in width). Kept layers
stay as A has them (narrowed, if the plan narrowed them).

`--upto all` restores every bundle and the width bundle `_width`: the result
is the original checkpoint, every file byte for byte (same shard names, same
safetensors headers, taken from A/original_config/, same config.json).

Everything restore needs is in OUT: A/manifest.json (bundles, layer widths,
source fingerprint), A/prune_log.json (where every original tensor went),
bundles/*/bundle_meta.json and bundles/_width/width_meta.json (kept positions
of every cut axis). Like apply, it streams tensor by tensor and writes to a
temporary directory renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.architectures import read_facts
from compiler.checkpoint import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    TensorInfo,
    architecture_of,
    tensor_index,
)
from executor import slicing
from executor.apply import (
    BUNDLE_META,
    DEFAULT_MAX_SHARD_BYTES,
    LAYERS_MAP,
    MANIFEST,
    ORIGINAL_CONFIG_DIR,
    ORIGINAL_HEADERS,
    PRUNE_LOG,
    WIDTH_BUNDLE,
    WIDTH_META,
    install,
    layer_name,
    layer_pattern,
    progress_bar,
    write_json,
)
from executor.configs import LayerShape, build_config
from executor.safetensors_io import (
    OutEntry,
    SourceFiles,
    TensorIOError,
    file_index,
    read_raw,
)
from executor.safetensors_io import write_file as write_st


class RestoreError(Exception):
    """OUT is incomplete or inconsistent, or DEST cannot be written; nothing was written."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RestoreError(f"{path}: missing; is this the output of `plancc apply`?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RestoreError(f"{path}: cannot read ({exc})") from None


@dataclass(frozen=True)
class Applied:
    """An apply output directory, read."""

    root: Path
    manifest: dict[str, Any]
    log: list[dict[str, Any]]
    original_config: dict[str, Any]
    bundle_names: tuple[str, ...]

    @property
    def a(self) -> Path:
        return self.root / "A"

    @staticmethod
    def read(root: Path) -> Applied:
        a = root / "A"
        if not a.is_dir():
            raise RestoreError(f"{root}: no A/ directory; pass the -o directory of `plancc apply`")
        manifest = _read_json(a / MANIFEST)
        log = _read_json(a / PRUNE_LOG)["tensors"]
        config = _read_json(a / ORIGINAL_CONFIG_DIR / CONFIG_NAME)
        names = tuple(sorted(manifest["removed"]["bundles"]))
        fp = manifest["source"]["fingerprint"]
        metas = [(n, root / "bundles" / n / BUNDLE_META) for n in names]
        if manifest["removed"]["width"]["dir"]:
            metas.append((WIDTH_BUNDLE, root / "bundles" / WIDTH_BUNDLE / WIDTH_META))
        for name, path in metas:
            meta = _read_json(path)
            if meta.get("source_fingerprint") != fp:
                raise RestoreError(
                    f"{path}: bundle {name} was cut from another checkpoint "
                    f"({meta.get('source_fingerprint')}, A says {fp}); "
                    "bundles and A must come from the same `plancc apply` run"
                )
        return Applied(root, manifest, log, config, names)


class _Sources:
    """Tensor indexes of A and of the bundle files, read once each."""

    def __init__(self, applied: Applied) -> None:
        self.applied = applied
        try:
            self.a = tensor_index(applied.a)
        except CheckpointError as exc:
            raise RestoreError(str(exc)) from None
        self._files: dict[str, dict[str, TensorInfo]] = {}

    def in_file(self, rel: str, name: str) -> tuple[Path, TensorInfo]:
        """A tensor of a file given relative to OUT ("bundles/B/layer_021.safetensors")."""
        path = self.applied.root / rel
        if rel not in self._files:
            try:
                self._files[rel] = file_index(path)
            except CheckpointError as exc:
                raise RestoreError(str(exc)) from None
        info = self._files[rel].get(name)
        if info is None:
            raise RestoreError(f"{path}: tensor {name!r} is missing; the bundle is incomplete")
        return path, info

    def in_a(self, name: str) -> tuple[Path, TensorInfo]:
        info = self.a.get(name)
        if info is None:
            raise RestoreError(f"{self.applied.a}: tensor {name!r} is missing; A is incomplete")
        return self.applied.a / info.file, info


def _copy(name: str, path: Path, info: TensorInfo) -> OutEntry:
    begin, end = info.byte_range
    return OutEntry(name, info.dtype, info.shape, copy=(path, begin, end))


def _original_entry(
    entry: Mapping[str, Any],
    src: _Sources,
    files: SourceFiles,
    selections: Mapping[str, list[int]],
) -> OutEntry:
    """The original bytes of one source tensor, from A, a bundle or the width bundle."""
    name, action = entry["source"], entry["action"]
    if action == "copied":
        path, info = src.in_a(entry["output"]["name"])
        return _copy(name, path, info)
    if action == "bundled":
        path, info = src.in_file(entry["bundle_file"], name)
        return _copy(name, path, info)
    removed = entry["removed"]
    if removed["whole"]:
        path, info = src.in_file(removed["file"], name)
        return _copy(name, path, info)
    kept_path, kept_info = src.in_a(entry["output"]["name"])
    gone_path, gone_info = src.in_file(removed["file"], name)
    axis, key = removed["axis"], removed["selection"]
    shape = tuple(entry["shape"])

    def produce() -> np.ndarray:
        kept = read_raw(files, kept_path, kept_info, slot="kept")
        gone = read_raw(files, gone_path, gone_info, slot="removed")
        idx = np.asarray(selections[key], dtype=np.int64)
        buf = files.array("merged", slicing.cut_shape(kept.shape, axis, shape[axis]))
        out = slicing.merge(kept, gone, axis, idx, shape[axis], out=buf)
        assert out.shape[:-1] == shape, (name, out.shape, shape)
        return out

    return OutEntry(name, entry["dtype"], shape, produce=produce)


@dataclass(frozen=True)
class RestoreResult:
    dest: Path
    seconds: float
    layers: tuple[int, ...]  # original index of every layer of the result
    complete: bool  # the original checkpoint, file for file


def restore(root: Path, upto: str, dest: Path, force: bool = False) -> RestoreResult:
    """Rebuild a model from OUT (`root`) with bundles up to `upto` (or `all`) back."""
    start = time.perf_counter()
    applied = Applied.read(root)
    if upto != "all" and upto not in applied.bundle_names:
        have = ", ".join(applied.bundle_names) or "none"
        raise RestoreError(f"--upto {upto}: no such bundle in {root} (bundles: {have}; or `all`)")
    if dest.exists() and not force:
        raise RestoreError(f"{dest} already exists; pass --force to replace it")
    if dest.resolve() == root.resolve() or root.resolve().is_relative_to(dest.resolve()):
        raise RestoreError(f"{dest}: the output would overlap {root}; choose another -o")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if upto == "all":
            layers = _restore_all(applied, tmp)
        else:
            layers = _restore_partial(applied, upto, tmp)
        install(tmp, dest)
    except TensorIOError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RestoreError(str(exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RestoreResult(dest, time.perf_counter() - start, layers, upto == "all")


def _width_selections(applied: Applied) -> dict[str, list[int]]:
    if not applied.manifest["removed"]["width"]["dir"]:
        return {}
    return _read_json(applied.root / "bundles" / WIDTH_BUNDLE / WIDTH_META)["selections"]


def _copy_side_files(applied: Applied, dest: Path) -> None:
    for name in applied.manifest.get("copied_files", []):
        shutil.copyfile(applied.a / name, dest / name)


def _restore_all(applied: Applied, dest: Path) -> tuple[int, ...]:
    """The original checkpoint: original headers, tensors at their original offsets."""
    src = _Sources(applied)
    selections = _width_selections(applied)
    headers: dict[str, str] = _read_json(applied.a / ORIGINAL_CONFIG_DIR / ORIGINAL_HEADERS)
    log = {e["source"]: e for e in applied.log}
    plans: list[tuple[str, bytes, list[OutEntry]]] = []
    with SourceFiles() as files:
        for file, text in sorted(headers.items()):
            header = json.loads(text)
            names = sorted(
                (n for n in header if n != "__metadata__"),
                key=lambda n: tuple(header[n]["data_offsets"]),
            )
            end = 0
            entries = []
            for n in names:
                begin, stop = header[n]["data_offsets"]
                if begin != end:
                    raise RestoreError(f"{file}: the original header has a gap before {n!r}")
                end = stop
                if n not in log:
                    raise RestoreError(f"{applied.a / PRUNE_LOG}: no record of tensor {n!r}")
                entries.append(_original_entry(log[n], src, files, selections))
            raw = text.encode("utf-8")
            plans.append((file, struct.pack("<Q", len(raw)) + raw, entries))
        total = sum(e.nbytes for _, _, es in plans for e in es)
        with progress_bar(total, "restore") as bar:
            for file, head, entries in plans:
                write_st(dest / file, entries, files, header=head, progress=bar.update)
    orig = applied.a / ORIGINAL_CONFIG_DIR
    shutil.copyfile(orig / CONFIG_NAME, dest / CONFIG_NAME)
    if (orig / SAFE_WEIGHTS_INDEX_NAME).is_file():
        shutil.copyfile(orig / SAFE_WEIGHTS_INDEX_NAME, dest / SAFE_WEIGHTS_INDEX_NAME)
    _copy_side_files(applied, dest)
    n = int(_read_json(applied.a / LAYERS_MAP)["original_layers"])
    return tuple(range(n))


def _restore_partial(applied: Applied, upto: str, dest: Path) -> tuple[int, ...]:
    """A with the layers of bundles up to `upto` back in their original places."""
    config = applied.original_config
    arch = architecture_of(config)
    facts = read_facts(arch, config)
    pattern = layer_pattern(arch)
    restored = applied.bundle_names[: applied.bundle_names.index(upto) + 1]
    bundles = applied.manifest["removed"]["bundles"]
    back = {i for name in restored for i in bundles[name]["layers"]}
    shapes = {s["original"]: LayerShape.from_json(s) for s in applied.manifest["layers"]}
    for i in back:
        kv = facts.get("kv_heads", facts["heads"])
        shapes[i] = LayerShape(i, facts["heads"], kv, facts.get("ffn"))
    order = sorted(shapes)
    new_of = {orig: j for j, orig in enumerate(order)}

    src = _Sources(applied)
    model_level: list[OutEntry] = []
    per_layer: dict[int, list[OutEntry]] = {}

    def rename(name: str) -> tuple[int | None, str]:
        m = pattern.match(name)
        if m is None:
            return None, name
        return int(m.group(1)), m.group(2)

    for entry in applied.log:
        layer, rel = rename(entry["source"])
        if layer is not None and layer not in shapes:
            continue  # in a bundle that stays out
        if entry["action"] == "bundled":
            path, info = src.in_file(entry["bundle_file"], entry["source"])
        else:
            path, info = src.in_a(entry["output"]["name"])
        if layer is None:
            model_level.append(_copy(info.name, path, info))
        else:
            new_name = layer_name(arch, new_of[layer], rel)
            per_layer.setdefault(layer, []).append(_copy(new_name, path, info))
    for added in applied.manifest.get("added", []):
        path, info = src.in_a(added["name"])
        _, rel = rename(added["name"])
        layer = int(added["layer"])
        new_name = layer_name(arch, new_of[layer], rel)
        per_layer.setdefault(layer, []).append(_copy(new_name, path, info))

    entries = model_level + [e for i in order for e in per_layer.get(i, [])]
    shards = _pack(entries, DEFAULT_MAX_SHARD_BYTES)
    new = build_config(config, arch, facts, [shapes[i] for i in order])
    with SourceFiles() as files, progress_bar(sum(e.nbytes for e in entries), "restore") as bar:
        for file, es in shards:
            write_st(dest / file, es, files, progress=bar.update)
    if len(shards) > 1:
        write_json(
            dest / SAFE_WEIGHTS_INDEX_NAME,
            {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": dict(sorted((e.name, f) for f, es in shards for e in es)),
            },
        )
    write_json(dest / CONFIG_NAME, new.config)
    _copy_side_files(applied, dest)
    write_json(
        dest / LAYERS_MAP,
        {"new_to_original": order, "original_layers": len(shapes) + _still_out(applied, restored)},
    )
    write_json(
        dest / MANIFEST,
        {
            "format": 1,
            "restored_from": str(applied.root),
            "upto": upto,
            "bundles_restored": list(restored),
            "bundles_still_out": [b for b in applied.bundle_names if b not in restored],
            "source": applied.manifest["source"],
            "layers": [shapes[i].to_json() for i in order],
            "uniform": new.uniform,
            "stock_loadable": not new.needs_loader,
            "loader": "executor.load"
            if new.needs_loader
            else "transformers.AutoModelForCausalLM.from_pretrained",
            "loadability": new.reason,
        },
    )
    return tuple(order)


def _still_out(applied: Applied, restored: tuple[str, ...]) -> int:
    bundles = applied.manifest["removed"]["bundles"]
    return sum(len(bundles[b]["layers"]) for b in applied.bundle_names if b not in restored)


def _pack(entries: list[OutEntry], max_bytes: int) -> list[tuple[str, list[OutEntry]]]:
    from executor.safetensors_io import order_for_alignment, pack_by_size, shard_names

    groups = pack_by_size(entries, lambda e: e.nbytes, max_bytes)
    names = shard_names(len(groups))
    return [(n, order_for_alignment(g)) for n, g in zip(names, groups, strict=True)]
