"""What a checkpoint directory says about itself, read without loading weights.

A plan pins the model it was made for by its shape facts and a fingerprint;
`plangen header` prints them, `plancc check --model` and `plancc apply`
compare them. All of that needs only `config.json` and the safetensors
headers (a few kilobytes, even for a 70B model), so this module reads exactly
those, with the standard library alone: no torch import, no tensor data read.
Anything wrong with the files is a `CheckpointError` whose message names the
file and says what to do, because the person reading it is usually holding a
half-downloaded or hand-assembled checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.architectures import (
    ARCH_NAMES,
    Architecture,
    TensorSpec,
    architecture_for_model_type,
    mla_sizes,
    read_facts,
)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Pickle-based checkpoints: loading them can execute arbitrary code, so they are
# refused with a useful message unless the caller passes `allow_pickle` (then
# only `pytorch_model.bin` or its sharded index are read, with torch's
# `weights_only` loader).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# torch dtype name → the safetensors dtype name (what a converted checkpoint's
# headers, and so its fingerprint, say).
TORCH_TO_SAFETENSORS_DTYPE: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "complex64": "C64",
}

# The safetensors library itself refuses headers above 100 MB; a larger length
# field means the file is not safetensors (or its first bytes are damaged).
MAX_HEADER_BYTES = 100_000_000

# Bits per element of each safetensors dtype, to check that a tensor's byte
# range matches its shape (a mismatch means a corrupt or hand-edited header).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class CheckpointError(Exception):
    """A checkpoint directory or file cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it.

    `file` is the shard's name relative to the model directory. `data_offsets`
    are the header's (begin, end), relative to the start of the data section;
    `data_start` is where that section begins in the file (8 + header length),
    so `byte_range` gives the absolute bytes an executor can copy unchanged.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    data_offsets: tuple[int, int]
    data_start: int = 0

    @property
    def byte_range(self) -> tuple[int, int]:
        """Absolute (begin, end) byte positions of the tensor's data in its file."""
        return (self.data_start + self.data_offsets[0], self.data_start + self.data_offsets[1])

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class CheckpointFacts:
    """Everything `plangen header` and `plancc check --model` need from a checkpoint.

    `facts` are the plan-vocabulary facts (`read_facts`) plus `fingerprint`.
    """

    model_dir: Path
    config: dict[str, Any]
    arch: Architecture
    facts: dict[str, Any]
    index: dict[str, TensorInfo]

    @property
    def name(self) -> str:
        """The model's name in a plan: the checkpoint directory's basename.

        `abspath`, not `resolve`: `.` and `dir/` get their real name, but a
        symlink keeps the name the user gave it.
        """
        return Path(os.path.abspath(self.model_dir)).name

    def model_block(self) -> str:
        return format_model_block(self.name, self.arch.name, self.facts)


# ---- safetensors headers ------------------------------------------------------


CHECKPOINT_FIX = "re-download or re-save the checkpoint (`save_pretrained` writes valid files)"


def _read_header(path: Path, fix: str = CHECKPOINT_FIX) -> tuple[dict[str, Any], int]:
    """The parsed header of one safetensors file and where its data section starts.

    `fix` ends every error message: what to do about a damaged file depends on
    whose file it is (a downloaded checkpoint, or an apply output).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated: {size} bytes, too short for a safetensors header; {fix}"
                )
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a safetensors file: header length field says {length} bytes "
                    f"(the limit is {MAX_HEADER_BYTES}); {fix}"
                )
            if 8 + length > size:
                raise CheckpointError(
                    f"{path}: truncated: the header claims {length} bytes but the file has only "
                    f"{size - 8} after the length field; {fix}"
                )
            raw = fh.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; {fix}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; make the file readable") from None

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt safetensors header (not valid JSON: {exc}); {fix}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")

    data_start = 8 + length
    data_len = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, entry, data_len, fix)
    return header, data_start


def _check_entry(path: Path, name: str, entry: Any, data_len: int, fix: str) -> None:
    """One tensor entry must have a dtype, a shape and offsets inside the file."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: corrupt header entry (not an object); {fix}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: corrupt header entry (no dtype); {fix}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{where}: corrupt header entry (bad shape {shape!r}); {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(
            f"{where}: corrupt header entry (bad data_offsets {offsets!r}); {fix}"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: corrupt header entry (data_offsets {offsets}); {fix}")
    if end > data_len:
        raise CheckpointError(
            f"{where}: data ends at byte {end} of the data section, past the end of the file "
            f"({data_len} data bytes): the file is truncated; {fix}"
        )
    bits = DTYPE_BITS.get(dtype)
    if bits is not None and bits % 8 == 0:
        numel = 1
        for d in shape:
            numel *= d
        if numel * bits // 8 != end - begin:
            raise CheckpointError(
                f"{where}: shape {shape} of {dtype} needs {numel * bits // 8} bytes but the header "
                f"gives {end - begin}; {fix}"
            )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(path: str | Path, fix: str = CHECKPOINT_FIX) -> dict[str, Any]:
    """The JSON header of a safetensors file, validated, without reading tensor data.

    Layout: an 8-byte little-endian header length N, then N bytes of JSON mapping
    each tensor name to {dtype, shape, data_offsets} (plus an optional
    `__metadata__`). Raises `CheckpointError` for a missing, truncated or
    corrupt file: a header longer than the file, invalid JSON, or a tensor whose
    data offsets run past the end of the file.
    """
    header, _ = _read_header(Path(path), fix)
    return header


# ---- the tensor index -----------------------------------------------------------


def _pickle_files(model_dir: Path) -> list[str]:
    return sorted(
        p.name for p in model_dir.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)
    )


def _shard_files(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """Safetensors files to read, and the index's weight map when sharded."""
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: no such directory")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory; pass the checkpoint directory")
    index_path = model_dir / SAFE_WEIGHTS_INDEX_NAME
    single = (model_dir / SAFE_WEIGHTS_NAME).is_file()
    if single and not index_path.exists():
        return [SAFE_WEIGHTS_NAME], None
    if index_path.exists():
        # An index beside a single model.safetensors is read too: if it does not
        # describe that file exactly, one of the two is stale and that is an error.
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index_path}: corrupt shard index ({exc.__class__.__name__}: {exc}); "
                "re-download it or re-save the checkpoint"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: corrupt shard index (`weight_map` must map tensor names to "
                "file names); re-download it or re-save the checkpoint"
            )
        if not weight_map:
            raise CheckpointError(
                f"{index_path}: the shard index lists no tensors; re-download it or re-save "
                "the checkpoint"
            )
        for shard in set(weight_map.values()):
            if Path(shard).name != shard:
                raise CheckpointError(
                    f"{index_path}: shard {shard!r} is not a file name in the checkpoint directory"
                )
        if single and set(weight_map.values()) != {SAFE_WEIGHTS_NAME}:
            raise CheckpointError(
                f"{index_path}: the checkpoint has a single {SAFE_WEIGHTS_NAME}, but its shard "
                "index names other files; one of them is stale: remove the index if "
                f"{SAFE_WEIGHTS_NAME} is the checkpoint, or re-download it"
            )
        return sorted(set(weight_map.values())), weight_map
    pickles = _pickle_files(model_dir)
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); they are refused "
            "because loading a pickle can run arbitrary code. Convert the model to safetensors "
            "(load it and `save_pretrained`), or, for a checkpoint you trust, pass "
            "`--allow-pickle` (plangen header, plancc check --model, plancc apply)"
        )
    raise CheckpointError(
        f"{model_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; "
        "pass a Hugging Face checkpoint directory (saved with `save_pretrained`)"
    )


def pickle_shards(model_dir: Path) -> list[str] | None:
    """The pickle weight files of a checkpoint without safetensors, or None.

    `pytorch_model.bin`, or the shards `pytorch_model.bin.index.json` names.
    """
    if (model_dir / SAFE_WEIGHTS_NAME).is_file() or (model_dir / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return None
    if (model_dir / PICKLE_WEIGHTS_NAME).is_file():
        return [PICKLE_WEIGHTS_NAME]
    index_path = model_dir / PICKLE_WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise CheckpointError(
            f"{index_path}: corrupt shard index ({exc.__class__.__name__}: {exc}); "
            "re-download it or re-save the checkpoint"
        ) from None
    for shard in files:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(
                f"{index_path}: shard {shard!r} is not a file name in the checkpoint directory"
            )
    return files


def load_pickle_shard(path: Path) -> dict[str, Any]:
    """One pickle shard's state dict, via torch's `weights_only` loader (mmap when possible).

    Imports torch (only this pickle path does). Raises `CheckpointError` when
    the file is missing, is not a state dict of tensors, or holds anything the
    restricted unpickler refuses.
    """
    import torch

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(True)
        except RuntimeError:  # legacy (non-zip) format: mmap is not possible
            state = load(False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; the checkpoint is incomplete") from None
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise CheckpointError(
            f"{path}: cannot load it with torch.load(weights_only=True) "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "re-download the checkpoint or convert it to safetensors yourself"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def safetensors_dtype(tensor: Any) -> str:
    """The safetensors name (F32, BF16, ...) of a torch tensor's dtype."""
    name = str(tensor.dtype).removeprefix("torch.")
    try:
        return TORCH_TO_SAFETENSORS_DTYPE[name]
    except KeyError:
        raise CheckpointError(f"dtype {name} has no safetensors equivalent") from None


def pickle_tensor_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a pickle checkpoint: names, shapes and safetensors dtype names.

    Loads one shard at a time (mmap, so tensor data is not read). `file` is the
    pickle shard; `data_offsets` are (0, nbytes) as there are no byte ranges.
    """
    model_dir = Path(model_dir)
    files = pickle_shards(model_dir)
    if files is None:
        raise CheckpointError(
            f"{model_dir}: no {PICKLE_WEIGHTS_NAME} or {PICKLE_WEIGHTS_INDEX_NAME} "
            "(and no safetensors files)"
        )
    index: dict[str, TensorInfo] = {}
    for file in files:
        state = load_pickle_shard(model_dir / file)
        for name, t in state.items():
            if name in index:
                raise CheckpointError(
                    f"{model_dir / file}: tensor {name!r} is also in {index[name].file}; "
                    "the shards overlap, re-download the checkpoint"
                )
            dtype = safetensors_dtype(t)
            nbytes = t.numel() * t.element_size()
            index[name] = TensorInfo(name, tuple(t.shape), dtype, file, (0, nbytes))
        del state
    return dict(sorted(index.items()))


def tensor_index(
    model_dir: str | Path, allow_pickle: bool = False, fix: str = CHECKPOINT_FIX
) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint, from its safetensors headers only.

    With `allow_pickle`, a checkpoint with only `pytorch_model.bin` (or its
    sharded index) is read with torch instead (`pickle_tensor_index`).

    Reads `model.safetensors`, or the shards named by
    `model.safetensors.index.json`, and cross-checks the index against the shard
    headers (a tensor the index places in the wrong shard, or a shard tensor the
    index omits, means a mixed-up download). Pickle-only checkpoints are refused.
    Returns names in sorted order, so iteration is deterministic.
    """
    model_dir = Path(model_dir)
    if allow_pickle and model_dir.is_dir() and pickle_shards(model_dir) is not None:
        return pickle_tensor_index(model_dir)
    files, weight_map = _shard_files(model_dir)
    index: dict[str, TensorInfo] = {}
    for file in files:
        path = model_dir / file
        header, data_start = _read_header(path, fix)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in index:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is also in {index[name].file}; "
                    "the shards overlap, re-download the checkpoint"
                )
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is not listed for this shard in "
                    f"{SAFE_WEIGHTS_INDEX_NAME} (it says {weight_map.get(name)!r}); "
                    "the index and shards disagree, re-download the checkpoint"
                )
            begin, end = entry["data_offsets"]
            index[name] = TensorInfo(
                name=name,
                shape=tuple(entry["shape"]),
                dtype=entry["dtype"],
                file=file,
                data_offsets=(begin, end),
                data_start=data_start,
            )
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(index))
        if missing:
            raise CheckpointError(
                f"{model_dir / SAFE_WEIGHTS_INDEX_NAME}: {len(missing)} tensor(s) listed but "
                f"absent from their shards (first: {missing[0]!r} in {weight_map[missing[0]]}); "
                "re-download the checkpoint"
            )
    return dict(sorted(index.items()))


# ---- fingerprint --------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for hashing: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprinted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json less the keys that record who saved it, not what the model is."""
    return {
        k: v for k, v in config.items() if k != "transformers_version" and not k.startswith("_")
    }


def fingerprint(config: Mapping[str, Any], index: Mapping[str, TensorInfo]) -> str:
    """The identity of a checkpoint's structure, as written in a plan's model block.

    Definition (a contract: other tools may recompute it):

        "sha256:" + sha256(canonical_json({
            "config": <config.json as parsed JSON, without bookkeeping keys:
                       `transformers_version` and keys starting with `_`>,
            "tensors": sorted([name, list(shape), dtype] for every tensor),
        }).encode("utf-8")).hexdigest()

    with canonical_json = json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False). It covers every config value that describes the model
    (re-saving with another transformers version, which only rewrites
    `transformers_version` and `_name_or_path`-style keys, keeps it) and every
    tensor's name, shape and dtype, but not the weights: a fine-tune of
    the same model shares its fingerprint, which is what a structural plan
    needs, and computing it never reads tensor data.
    """
    tensors = sorted([info.name, list(info.shape), info.dtype] for info in index.values())
    payload = canonical_json({"config": fingerprinted_config(config), "tensors": tensors})
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


WEIGHTS_CACHE = "weights-digests.json"  # compiler.cache: file identity -> digest
_WEIGHTS_CACHE_ENTRIES = 64  # the newest this many are kept
_HASH_BLOCK = 1 << 24  # bytes per read and update (hashlib releases the GIL for these)


def weights_digest(model_dir: str | Path, index: Mapping[str, TensorInfo]) -> str:
    """The identity of a checkpoint's weights: what a sidecar was measured on.

    Definition (a contract, next to `fingerprint`, which it complements):

        "sha256:" + sha256(data(t1) + data(t2) + ... ).hexdigest()

    over every tensor of the safetensors checkpoint in sorted name order, where
    data(t) is the tensor's bytes exactly as stored (its `data_offsets` range
    of its shard's data section). Names, shapes and dtypes are not repeated:
    the fingerprint pins them, so the two together identify the checkpoint.
    Unlike the fingerprint, it reads every byte (a few seconds per GB, through
    one 16 MiB buffer), so the result is memoized in plancc's cache under the
    shards' (path, size, mtime_ns, inode): a second command on an unchanged
    checkpoint pays nothing. Pickle checkpoints have no digest (convert them).
    """
    model_dir = Path(model_dir)
    files = sorted({info.file for info in index.values()})
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise CheckpointError(
            f"{model_dir}: the weights digest is defined over safetensors files, and "
            f"{pickled[0]} is a pickle; convert the checkpoint to safetensors first"
        )
    key = _weights_cache_key(model_dir, files)
    from compiler import cache

    known = cache.read_json(WEIGHTS_CACHE)
    if key is not None and isinstance(known.get(key), str):
        return known[key]
    digest = _hash_weights(model_dir, index, files)
    if key is not None:
        kept = dict(list(known.items())[-(_WEIGHTS_CACHE_ENTRIES - 1) :])
        kept[key] = digest
        cache.write_json(WEIGHTS_CACHE, kept)
    return digest


def _weights_cache_key(model_dir: Path, files: list[str]) -> str | None:
    """The shards' identities (a rewrite changes size, mtime or inode); None if unreadable."""
    try:
        parts = []
        for f in files:
            st = (model_dir / f).stat()
            real = os.path.realpath(model_dir / f)
            parts.append([real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    except OSError:
        return None
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def _hash_weights(model_dir: Path, index: Mapping[str, TensorInfo], files: list[str]) -> str:
    """sha256 over the tensors' data bytes in sorted name order (see `weights_digest`).

    Read into one reused buffer rather than memory-mapped: the process's memory stays
    at the buffer's size whatever the checkpoint's (a mapping would count every page
    it touched)."""
    h = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    handles: dict[str, Any] = {}
    try:
        for f in files:
            handles[f] = (model_dir / f).open("rb", buffering=0)
        for name in sorted(index):
            info = index[name]
            begin, end = info.byte_range
            fh = handles[info.file]
            fh.seek(begin)
            left = end - begin
            while left:
                got = fh.readinto(view[: min(left, _HASH_BLOCK)])
                if not got:
                    raise OSError(f"{info.file} ends inside tensor {name!r}")
                h.update(view[:got])
                left -= got
    except OSError as exc:
        raise CheckpointError(
            f"{model_dir}: cannot read the weights ({exc}); {CHECKPOINT_FIX}"
        ) from None
    finally:
        view.release()
        for fh in handles.values():
            fh.close()
    return "sha256:" + h.hexdigest()


# ---- config and facts ---------------------------------------------------------


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, as a dict."""
    path = Path(model_dir) / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not found; pass a Hugging Face checkpoint directory "
            "(it holds config.json next to the safetensors files)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object; fix or re-download it")
    return config


def architecture_of(config: Mapping[str, Any], where: str = CONFIG_NAME) -> Architecture:
    """The table entry for a config's `model_type`; unknown types list what is supported."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(
            f"{where}: no `model_type`; plancc needs it to know the layout. "
            f"Supported: {', '.join(ARCH_NAMES)}"
        )
    arch = architecture_for_model_type(model_type)
    if arch is None:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported. "
            f"Supported architectures: {', '.join(ARCH_NAMES)} "
            "(adding one is an entry in compiler/architectures.py)"
        )
    return arch


def load_checkpoint_facts(model_dir: str | Path, allow_pickle: bool = False) -> CheckpointFacts:
    """Read config.json and the safetensors headers of a checkpoint; nothing else.

    The facts are `read_facts(arch, config)` plus `fingerprint`. With
    `allow_pickle`, a pickle-only checkpoint's tensors are read with torch
    (`pickle_tensor_index`); its fingerprint is that of the same weights saved
    as safetensors.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(
            f"{model_dir}: no such directory; pass a Hugging Face checkpoint directory"
        )
    config = read_config(model_dir)
    arch = architecture_of(config, str(model_dir / CONFIG_NAME))
    index = tensor_index(model_dir, allow_pickle=allow_pickle)
    arch = checkpoint_form(arch, index)
    facts = read_facts(arch, config)
    if isinstance(facts.get("layers"), int):
        problem = layer_extent_problem(arch, facts["layers"], index)
        if problem:
            raise CheckpointError(
                f"{model_dir}: {problem}: the tensors and config.json disagree, so no plan "
                "can be applied safely; re-download the checkpoint, or fix "
                "`num_hidden_layers` in config.json if you assembled it yourself"
            )
    facts["fingerprint"] = fingerprint(config, index)
    return CheckpointFacts(model_dir=model_dir, config=config, arch=arch, facts=facts, index=index)


def checkpoint_form(arch: Architecture, index: Mapping[str, TensorInfo]) -> Architecture:
    """The table entry as this checkpoint stores it: a MoE family whose routed experts
    are fused on disk (`experts.gate_up_proj`) gets `fused_experts_form`."""
    from compiler.architectures import FUSED_GATE_UP, fused_experts_form

    fused = fused_experts_form(arch)
    if fused is None:
        return arch
    pattern = arch.layer_pattern()
    for name in index:
        m = pattern.match(name)
        if m and m.group(2) == FUSED_GATE_UP:
            return fused
    return arch


# ---- expected tensors -----------------------------------------------------------


def layer_extent_problem(
    arch: Architecture, layers: int, index: Mapping[str, TensorInfo]
) -> str | None:
    """Whether the tensors hold exactly layers 0..layers-1 (each with some tensor).

    Extra layers would otherwise be copied as if they were model-level tensors
    and missing ones would leave holes: either way the output would be wrong.
    """
    pattern = arch.layer_pattern()
    present: set[int] = set()
    for name in index:
        m = pattern.match(name)
        if m:
            present.add(int(m.group(1)))
    extra = sorted(i for i in present if i >= layers)
    if extra:
        return (
            f"config.json says {layers} layers but the tensors also hold layer(s) {_ranges(extra)}"
        )
    missing = sorted(set(range(layers)) - present)
    if missing:
        return f"config.json says {layers} layers but layer(s) {_ranges(missing)} have no tensors"
    return None


def _ranges(values: list[int]) -> str:
    from compiler import ir

    return str(ir.Selection.from_ints(values))


def _space_sizes(facts: Mapping[str, Any]) -> dict[str, int | None]:
    """The size of every space of the table (see compiler.architectures) from facts."""

    def get(key: str) -> int | None:
        v = facts.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    heads, kv_heads, head_dim, ffn = get("heads"), get("kv_heads"), get("head_dim"), get("ffn")
    expert_ffn = get("expert_ffn")
    q = heads * head_dim if heads is not None and head_dim is not None else None
    kv = kv_heads * head_dim if kv_heads is not None and head_dim is not None else None
    return {
        "hidden": get("hidden"),
        "q": q,
        "kv": kv,
        "qkv": q + 2 * kv if q is not None and kv is not None else None,
        "head_dim": head_dim,
        "ffn": ffn,
        "gate_up": 2 * ffn if ffn is not None else None,
        "experts": get("experts"),
        "expert_ffn": get("expert_ffn"),
        "expert_gate_up": 2 * expert_ffn if expert_ffn is not None else None,
        "shared_ffn": get("shared_ffn"),
        "vocab": get("vocab"),
        "one": 1,
        **mla_sizes(facts, get("heads")),
    }


def _holds(when: str | None, facts: Mapping[str, Any]) -> bool:
    if when is None:
        return True
    if when == "untied":
        return not facts.get("tied", False)
    return bool(facts.get(when, False))


def _shape(spec: TensorSpec, sizes: Mapping[str, int | None], name: str) -> tuple[int, ...]:
    shape = []
    for dim in spec.dims:
        size = sizes.get(dim)
        if size is None:
            raise ValueError(
                f"tensor {name}: the size of space `{dim}` is unknown "
                "(a model fact it is computed from is missing)"
            )
        shape.append(size)
    return tuple(shape)


def expected_tensors(arch: Architecture, facts: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the architecture table predicts for these facts.

    This is the table's promise about a checkpoint: the executor slices by it and
    the cost model counts parameters from it, so the tests assert it equals what
    `save_pretrained` writes, name for name and shape for shape. Rules:
    `layer_prefix` with `{i}` for each layer, `{e}` for each routed expert;
    a `when` fact must be true (`untied` = not `tied`); MoE families use
    `dense_mlp` on the layers in `dense_layers` and `moe_mlp` elsewhere. Space
    sizes: q = heads*head_dim, kv = kv_heads*head_dim, qkv = q + 2kv,
    gate_up = 2*ffn, one = 1, the rest are facts of the same name. Order:
    model-level tensors, then layer by layer in table order.
    """
    sizes = _space_sizes(facts)
    layers = facts.get("layers")
    if not isinstance(layers, int):
        raise ValueError("expected_tensors needs the `layers` fact")
    dense = set(facts.get("dense_layers") or ())
    experts = sizes["experts"] or 0
    out: dict[str, tuple[int, ...]] = {}

    def add(spec: TensorSpec, name: str) -> None:
        if not _holds(spec.when, facts):
            return
        names: Iterable[str] = (
            [name.replace("{e}", str(e)) for e in range(experts)] if spec.per_expert else [name]
        )
        for n in names:
            out[n] = _shape(spec, sizes, n)

    for spec in arch.embeddings:
        add(spec, spec.name)
    for i in range(layers):
        prefix = arch.layer_prefix.replace("{i}", str(i))
        moe_layer = arch.moe and i not in dense
        for spec in arch.layer_tensors(moe_layer):
            add(spec, prefix + spec.name)
    return out


def tensor_mismatches(
    expected: Mapping[str, tuple[int, ...]], index: Mapping[str, TensorInfo]
) -> list[str]:
    """Human-readable differences between predicted tensors and a checkpoint's index."""
    problems = [f"missing: {n} {list(expected[n])}" for n in sorted(set(expected) - set(index))]
    problems += [
        f"unexpected: {n} {list(index[n].shape)}" for n in sorted(set(index) - set(expected))
    ]
    problems += [
        f"shape: {n} is {list(index[n].shape)}, expected {list(expected[n])}"
        for n in sorted(set(expected) & set(index))
        if tuple(index[n].shape) != tuple(expected[n])
    ]
    return problems


# ---- the model block ------------------------------------------------------------

# Booleans that default to false and are printed only when true (a block on a
# bias-free model stays short); `tied` is always printed, true or false.
OPTIONAL_FLAGS = ("qkv_bias", "o_bias", "mlp_bias")


def format_model_block(name: str, arch_name: str, facts: Mapping[str, Any]) -> str:
    """The `model "NAME" { ... }` block in canonical layout, ending with a newline.

    Printed by `compiler.fmt` (layout: `compiler.facts.FACT_LINES`), so a
    generated block and a formatted one are byte-identical. `qkv_bias`,
    `o_bias` and `mlp_bias` appear only when true; `dense_layers` only when
    the model has some.
    """
    from compiler import ir
    from compiler.fmt import format_model_block as print_block

    block = [ir.Fact("arch", arch_name)]
    for key, value in facts.items():
        if value is None or (key in OPTIONAL_FLAGS and value is not True):
            continue
        if isinstance(value, tuple | list | set | frozenset):
            if not value:
                continue
            value = ir.Selection.from_ints(sorted(set(value)))
        block.append(ir.Fact(key, value))
    return print_block(ir.ModelBlock(name, tuple(block)))
