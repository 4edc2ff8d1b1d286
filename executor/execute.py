"""Task execution: write each file of a job, header first, then tensor by tensor.

Untouched tensors are byte-range copies; cut ones are read, cut along their
axes and written; computed ones (`data`) are written as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler import geometry
from executor import slicing
from executor.integrity import Hasher
from executor.safetensors_io import (
    OutEntry,
    SourceFiles,
    decode,
    encode,
    order_for_alignment,
    read_raw,
    write_file,
)
from executor.tasks import ApplyJob, Cut, TensorTask


def _produce(
    task: TensorTask, model_dir: Path, files: SourceFiles, selections: Mapping[str, np.ndarray]
) -> Callable[[], np.ndarray | bytes]:
    def run() -> np.ndarray | bytes:
        if task.data is not None:
            return task.data
        assert task.source is not None
        raw = read_raw(files, model_dir / task.source.file, task.source)
        for k, c in enumerate(task.cuts):
            if c.experts:  # per expert (fused experts; the experts axis is cut first)
                raw = _per_expert(raw, c, selections)
                continue
            idx = selections[c.key]
            if c.removed:
                idx = geometry.complement(idx, raw.shape[c.axis])
            out = files.array(f"cut{k % 2}", slicing.cut_shape(raw.shape, c.axis, len(idx)))
            raw = slicing.take(raw, c.axis, idx, out=out)
        assert raw.shape[:-1] == task.shape, (task.name, raw.shape, task.shape)
        if task.scale is not None:  # `rescale`: in float64, rounded once to the dtype
            return encode(decode(raw, task.dtype).double() * task.scale, task.dtype)
        return raw

    return run


def _per_expert(raw: np.ndarray, cut: Cut, selections: Mapping[str, np.ndarray]) -> np.ndarray:
    """Slice j of axis 0 keeps its own expert's channels along `cut.axis`, in each of
    the `cut.parts` blocks (gate rows, then up rows)."""
    assert raw.shape[0] == len(cut.experts), (raw.shape, cut.experts)
    block = raw.shape[cut.axis] // cut.parts
    out = []
    for j, e in enumerate(cut.experts):
        ch = np.asarray(selections[f"{cut.key}.{e}"], dtype=np.int64)
        idx = np.concatenate([p * block + ch for p in range(cut.parts)])
        out.append(np.take(raw[j], idx, axis=cut.axis - 1))
    return np.stack(out)


def entries_for(
    tasks: tuple[TensorTask, ...],
    model_dir: Path,
    files: SourceFiles,
    selections: Mapping[str, np.ndarray],
) -> list[OutEntry]:
    """Output entries of one file, in data order."""
    out = []
    for t in tasks:
        if t.source is not None and not t.cuts and t.data is None and t.scale is None:
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
