"""The task list of `plancc apply`: every output tensor and where its bytes come from.

`executor.planning` builds it from a resolved plan before anything is written,
`executor.execute` writes it and `executor.install` records it: the three
stages share only these frozen records, and `ApplyError`, what any of them
raises when a plan cannot be applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler import geometry
from compiler.architectures import Architecture, TensorSpec
from compiler.checkpoint import TensorInfo
from executor.configs import LayerShape
from executor.experts import ExpertSelection
from executor.safetensors_io import (
    nbytes,
    pack_by_size,
    shard_names,
)

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


class ApplyError(Exception):
    """The plan cannot be applied; nothing was written. `details`: diagnostics to print."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


# ---- the task list ------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Keep the positions `selections[key]` along `axis` (or, `removed`, the others).

    `experts` (fused expert tensors, axis 0 = experts): a per-expert cut. Slice j of
    axis 0 keeps, in each of its `parts` blocks along `axis`, the channels
    `selections[f"{key}.{experts[j]}"]` of its own (original) expert.
    """

    axis: int
    key: str
    removed: bool = False
    experts: tuple[int, ...] = ()
    parts: int = 1

    def kept(self, selections: Mapping[str, np.ndarray]) -> int:
        """The length of the cut axis afterwards."""
        if self.experts:
            return self.parts * len(selections[f"{self.key}.{self.experts[0]}"])
        return len(selections[self.key])


@dataclass(frozen=True)
class TensorTask:
    """One tensor of an output file and where its bytes come from.

    `source` with no cuts: a byte-range copy. With cuts: read, cut, write.
    `data`: bytes computed while planning (a `compensate` bias, a `reconstruct`
    projection from the sidecar). `scale`: the values multiplied by it after the
    cuts (a kept expert's down projection under `rescale`).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    cuts: tuple[Cut, ...] = ()
    data: bytes | None = field(default=None, repr=False)
    scale: float | None = None

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
    layer_selections: Mapping[int, geometry.LayerSelection]
    expert_selections: Mapping[int, ExpertSelection]
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


def bundle_file(bundle: str, layer: int) -> str:
    return f"bundles/{bundle}/layer_{layer:03d}.safetensors"


def shards(tasks: list[TensorTask], max_bytes: int) -> list[FileTask]:
    """Consecutive tasks packed into shards of at most `max_bytes` (one tensor may exceed it)."""
    groups = pack_by_size(tasks, lambda t: t.nbytes, max_bytes)
    names = shard_names(len(groups))
    return [FileTask(f"A/{n}", tuple(g)) for n, g in zip(names, groups, strict=True)]


@dataclass(frozen=True)
class ApplyOptions:
    """How to write the output (the command line's flags)."""

    device: str = "cpu"
    force: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_pickle: bool = False
    copy_remote_code: bool = False
    hash_source: bool = False
    model_format: str | None = None  # hf | nemotron-nas | gguf; None: `executor.formats.choose`
    gguf_dtype: str = "f16"
    gguf_pre: str | None = None  # tokenizer.ggml.pre when its hash is not known
