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
source fingerprint, the sha256 of every file), A/prune_log.json (where every
original tensor went), bundles/*/bundle_meta.json and
bundles/_width/width_meta.json (kept positions of every cut axis).

Nothing is trusted unchecked: every metadata file is validated against its
schema (`executor.layout`), and every file the restore reads is hashed and
compared with the sha256 apply recorded before anything is written. With
`--upto all` the result's fingerprint (config + tensor headers) must equal the
source's, and where apply recorded the source files' sha256 (`--hash-source`),
the restored files must match them. `verify` runs the same checks alone
(`plancc verify OUT`). Like apply, restore streams tensor by tensor and writes
to a staging directory renamed into place at the end (`executor.outdir`).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.architectures import Architecture, read_facts
from compiler.checkpoint import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    TensorInfo,
    architecture_of,
    fingerprint,
    tensor_index,
)
from compiler.hashing import sha256_file
from executor import slicing
from executor.configs import LayerShape, build_config
from executor.execute import progress_bar
from executor.integrity import Hasher, output_files, verify_files
from executor.layout import (
    BUNDLE_META,
    BUNDLE_META_SCHEMA,
    DAMAGED,
    HEADERS_SCHEMA,
    LAYERS_MAP,
    LAYERS_MAP_SCHEMA,
    MANIFEST,
    MANIFEST_SCHEMA,
    MARKER,
    ORIGINAL_CONFIG_DIR,
    ORIGINAL_HEADERS,
    PRUNE_LOG,
    PRUNE_LOG_SCHEMA,
    WIDTH_BUNDLE,
    WIDTH_META,
    WIDTH_META_SCHEMA,
    WITHHELD_DIR,
    MetadataError,
    read_metadata,
    write_json,
)
from executor.outdir import read_marker, staged_output
from executor.safetensors_io import (
    OutEntry,
    SourceFiles,
    TensorIOError,
    file_index,
    read_raw,
)
from executor.safetensors_io import write_file as write_st
from executor.tasks import DEFAULT_MAX_SHARD_BYTES, layer_name


class RestoreError(Exception):
    """OUT is incomplete or inconsistent, or DEST cannot be written; nothing was written."""


def _read(path: Path, schema: Any) -> Any:
    try:
        return read_metadata(path, schema)
    except MetadataError as exc:
        raise RestoreError(str(exc)) from None


@dataclass(frozen=True)
class Applied:
    """An apply output directory, read."""

    root: Path
    manifest: dict[str, Any]
    log: list[dict[str, Any]]
    original_config: dict[str, Any]
    bundle_names: tuple[str, ...]
    selections: dict[str, list[int]]  # width_meta.json's kept positions ({} without _width)
    headers: dict[str, str]  # every source file's safetensors header text

    @property
    def a(self) -> Path:
        return self.root / "A"

    @property
    def recorded(self) -> dict[str, str]:
        """sha256 of every file apply wrote, by path relative to OUT."""
        return self.manifest["files"]

    @staticmethod
    def read(root: Path) -> Applied:
        """Read and validate every metadata file of an apply output."""
        a = root / "A"
        if not a.is_dir():
            raise RestoreError(f"{root}: no A/ directory; pass the -o directory of `plancc apply`")
        manifest = _read(a / MANIFEST, MANIFEST_SCHEMA)
        log = _read(a / PRUNE_LOG, PRUNE_LOG_SCHEMA)["tensors"]
        config = _read(a / ORIGINAL_CONFIG_DIR / CONFIG_NAME, dict)
        _read(a / LAYERS_MAP, LAYERS_MAP_SCHEMA)
        headers = _read(a / ORIGINAL_CONFIG_DIR / ORIGINAL_HEADERS, HEADERS_SCHEMA)
        names = tuple(sorted(manifest["removed"]["bundles"]))
        fp = manifest["source"]["fingerprint"]
        metas = [(n, root / "bundles" / n / BUNDLE_META, BUNDLE_META_SCHEMA) for n in names]
        width = manifest["removed"]["width"]["dir"]
        if width:
            path = root / "bundles" / WIDTH_BUNDLE / WIDTH_META
            metas.append((WIDTH_BUNDLE, path, WIDTH_META_SCHEMA))
        selections: dict[str, list[int]] = {}
        for name, path, schema in metas:
            meta = _read(path, schema)
            if meta["source_fingerprint"] != fp:
                raise RestoreError(
                    f"{path}: bundle {name} was cut from another checkpoint "
                    f"({meta['source_fingerprint']}, A says {fp}); "
                    "bundles and A must come from the same `plancc apply` run"
                )
            if name == WIDTH_BUNDLE:
                selections = meta["selections"]
        return Applied(root, manifest, log, config, names, selections, headers)

    def files_for(self, bundles: tuple[str, ...] | None) -> list[str]:
        """The files a restore of `bundles` (None: all) reads: those recorded under its
        folders and those present there, so an entry removed from the manifest's list
        cannot exempt a file from its check."""
        present = [p.relative_to(self.root).as_posix() for p in output_files(self.root)]
        names = {*self.recorded, *present} - {f"A/{MANIFEST}"}
        if bundles is None:
            return sorted(names)
        prefixes = ("A/", *(f"bundles/{b}/" for b in bundles))
        return sorted(r for r in names if r.startswith(prefixes))

    def verify(self, bundles: tuple[str, ...] | None = None) -> int:
        """Hash the files a restore of `bundles` reads; RestoreError on any difference
        (a changed manifest, a file apply did not record, a different sha256).

        Returns how many files were checked.
        """
        which = self.files_for(bundles)
        problems = _manifest_problems(self.root)
        recorded = [r for r in which if r in self.recorded]
        problems += verify_files(self.root, self.recorded, recorded)
        problems += [_unrecorded(self.root / r) for r in which if r not in self.recorded]
        if problems:
            raise RestoreError(_problems_text(self.root, sorted(problems)))
        return len(which)


def _unrecorded(path: Path) -> str:
    return (
        f"{path}: not written by `plancc apply` (absent from the manifest's file list: "
        "the list was edited, or the file was added)"
    )


def _manifest_problems(root: Path) -> list[str]:
    """A/manifest.json against the sha256 apply recorded in the output's marker.

    Outputs written before the marker recorded it have nothing to compare."""
    want = (read_marker(root) or {}).get("manifest_sha256")
    if not isinstance(want, str):
        return []
    got = sha256_file(root / "A" / MANIFEST)
    if got == want:
        return []
    return [
        f"{root / 'A' / MANIFEST}: sha256 {got[:16]}… differs from the {want[:16]}… apply "
        f"recorded in {MARKER} (the manifest was edited)"
    ]


def _problems_text(root: Path, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:20])
    more = f"\n  and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (
        f"{root}: {len(problems)} file(s) differ from what `plancc apply` wrote; nothing was "
        f"written; {DAMAGED}:\n  {shown}{more}"
    )


@dataclass(frozen=True)
class VerifyResult:
    root: Path
    files: int  # files whose sha256 matched


def verify(root: Path) -> VerifyResult:
    """`plancc verify OUT`: every check restore makes, without writing anything.

    Also refuses files under OUT that apply did not write (besides the marker).
    """
    applied = Applied.read(root)
    files = applied.verify()
    _Sources(applied)  # A's shards have valid headers
    return VerifyResult(root, files)


class _Sources:
    """Tensor indexes of A and of the bundle files, read once each."""

    def __init__(self, applied: Applied) -> None:
        self.applied = applied
        try:
            self.a = tensor_index(applied.a, fix=DAMAGED)
        except CheckpointError as exc:
            raise RestoreError(str(exc)) from None
        self._files: dict[str, dict[str, TensorInfo]] = {}

    def in_file(self, rel: str, name: str) -> tuple[Path, TensorInfo]:
        """A tensor of a file given relative to OUT ("bundles/B/layer_021.safetensors")."""
        path = self.applied.root / rel
        if rel not in self._files:
            try:
                self._files[rel] = file_index(path, fix=DAMAGED)
            except CheckpointError as exc:
                raise RestoreError(str(exc)) from None
        info = self._files[rel].get(name)
        if info is None:
            raise RestoreError(f"{path}: tensor {name!r} is missing; {DAMAGED}")
        return path, info

    def in_a(self, name: str) -> tuple[Path, TensorInfo]:
        info = self.a.get(name)
        if info is None:
            raise RestoreError(f"{self.applied.a}: tensor {name!r} is missing; {DAMAGED}")
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
    """Rebuild a model from OUT (`root`) with bundles up to `upto` (or `all`) back.

    Every file it reads is verified first; RestoreError (OutputError for DEST)
    with nothing written on any problem.
    """
    start = time.perf_counter()
    applied = Applied.read(root)
    if upto != "all" and upto not in applied.bundle_names:
        have = ", ".join(applied.bundle_names) or "none"
        raise RestoreError(f"--upto {upto}: no such bundle in {root} (bundles: {have}; or `all`)")
    restored = None if upto == "all" else _bundles_upto(applied, upto)
    applied.verify(restored)
    with staged_output(dest, "restore", force, inputs=[root]) as tmp:
        try:
            if restored is None:
                layers = _restore_all(applied, tmp)
            else:
                layers = _restore_partial(applied, restored, tmp)
        except TensorIOError as exc:
            raise RestoreError(str(exc)) from None
    return RestoreResult(dest, time.perf_counter() - start, layers, upto == "all")


def _bundles_upto(applied: Applied, upto: str) -> tuple[str, ...]:
    return applied.bundle_names[: applied.bundle_names.index(upto) + 1]


def _copy_side_files(applied: Applied, dest: Path, withheld: bool = False) -> None:
    """A's side files (and, for the original, the withheld remote-code files)."""
    for name in applied.manifest["copied_files"]:
        shutil.copyfile(applied.a / name, dest / name)
    if withheld:
        for name in applied.manifest.get("withheld_files", []):
            shutil.copyfile(applied.root / WITHHELD_DIR / name, dest / name)


def _restore_all(applied: Applied, dest: Path) -> tuple[int, ...]:
    """The original checkpoint: original headers, tensors at their original offsets."""
    src = _Sources(applied)
    selections = applied.selections
    headers = applied.headers
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
    _copy_side_files(applied, dest, withheld=True)
    _check_original(applied, dest, [file for file, _, _ in plans])
    n = int(_read(applied.a / LAYERS_MAP, LAYERS_MAP_SCHEMA)["original_layers"])
    return tuple(range(n))


def _check_original(applied: Applied, dest: Path, weight_files: list[str]) -> None:
    """The rebuilt checkpoint has the source's fingerprint (and sha256, where recorded)."""
    source = applied.manifest["source"]
    try:
        got = fingerprint(applied.original_config, tensor_index(dest, fix=DAMAGED))
    except CheckpointError as exc:
        raise RestoreError(f"the rebuilt checkpoint does not read back: {exc}") from None
    if got != source["fingerprint"]:
        raise RestoreError(
            f"the rebuilt checkpoint's fingerprint {got} is not the source's "
            f"{source['fingerprint']}; nothing was written; {DAMAGED}"
        )
    want = source.get("sha256")
    if not isinstance(want, dict):
        return
    hasher = Hasher(dest, workers=2)
    for file in weight_files:
        hasher.add(dest / file)
    for file, digest in hasher.result().items():
        if want.get(file) != digest:
            raise RestoreError(
                f"the rebuilt {file} has sha256 {digest[:16]}…, the source's was "
                f"{str(want.get(file))[:16]}…; nothing was written; {DAMAGED}"
            )


def _restore_partial(applied: Applied, restored: tuple[str, ...], dest: Path) -> tuple[int, ...]:
    """A with the layers of `restored` bundles back in their original places."""
    config = applied.original_config
    try:
        arch = architecture_of(config)
    except CheckpointError as exc:
        raise RestoreError(f"{applied.a / ORIGINAL_CONFIG_DIR}: {exc}") from None
    facts = read_facts(arch, config)
    upto = restored[-1]
    shapes = _partial_shapes(applied, restored, arch, facts)
    order = sorted(shapes)
    entries = _partial_entries(applied, arch, shapes, order)
    shards = _pack(entries, DEFAULT_MAX_SHARD_BYTES)
    remote = bool(applied.manifest.get("remote_code"))
    new = build_config(config, arch, facts, [shapes[i] for i in order], remote)
    _write_shards(dest, entries, shards)
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


def _partial_shapes(
    applied: Applied, restored: tuple[str, ...], arch: Architecture, facts: dict[str, Any]
) -> dict[int, LayerShape]:
    """Every layer of the result by original index: A's kept layers as apply
    recorded them, and each layer coming back from a bundle at the original
    checkpoint's full width (a bundle keeps whole layers)."""
    bundles = applied.manifest["removed"]["bundles"]
    back = {i for name in restored for i in bundles[name]["layers"]}
    shapes = {s["original"]: LayerShape.from_json(s) for s in applied.manifest["layers"]}
    for i in back:
        kv = facts.get("kv_heads", facts["heads"])
        if arch.moe and i not in facts.get("dense_layers", ()):
            moe = (facts.get("experts"), facts.get("expert_ffn"), facts.get("shared_ffn") or None)
            shapes[i] = LayerShape(i, facts["heads"], kv, None, (), *moe)
        else:
            shapes[i] = LayerShape(i, facts["heads"], kv, facts.get("ffn"))
    return shapes


def _partial_entries(
    applied: Applied, arch: Architecture, shapes: dict[int, LayerShape], order: list[int]
) -> list[OutEntry]:
    """The result's tensors, each a byte-range copy from A or a bundle renamed to
    its layer's new number: model-level tensors first, then layer by layer in
    `order`, the order the shards are packed in."""
    pattern = arch.layer_pattern()
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
        if entry["action"] == "removed":
            continue  # a dropped expert stays out (restore --upto all brings it back)
        if entry["action"] == "bundled":
            path, info = src.in_file(entry["bundle_file"], entry["source"])
        else:
            path, info = src.in_a(entry["output"]["name"])
            rel = rename(entry["output"]["name"])[1]  # a kept expert's new number
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
    return model_level + [e for i in order for e in per_layer.get(i, [])]


def _write_shards(
    dest: Path, entries: list[OutEntry], shards: list[tuple[str, list[OutEntry]]]
) -> None:
    """The packed shards under one progress bar, and their index when there is
    more than one: the part of a partial restore that scales with the model."""
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


def _still_out(applied: Applied, restored: tuple[str, ...]) -> int:
    bundles = applied.manifest["removed"]["bundles"]
    return sum(len(bundles[b]["layers"]) for b in applied.bundle_names if b not in restored)


def _pack(entries: list[OutEntry], max_bytes: int) -> list[tuple[str, list[OutEntry]]]:
    from executor.safetensors_io import order_for_alignment, pack_by_size, shard_names

    groups = pack_by_size(entries, lambda e: e.nbytes, max_bytes)
    names = shard_names(len(groups))
    return [(n, order_for_alignment(g)) for n, g in zip(names, groups, strict=True)]
