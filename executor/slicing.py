"""The byte-level cuts and channel sums: tensor work on the positions a plan keeps.

Which positions survive is the compiler's (`compiler.geometry`: `Geometry`,
`LayerSelection`, `space_indices`, `complement`, `top_channels`). Everything
here works on raw bytes shaped (*shape, itemsize), so slicing and merging are
exact for every dtype.

The `magnitude` metric (the default `by`): channel c of a dense MLP scores
sqrt(sum of the squares of every weight whose ffn coordinate is c), over all
of the layer's MLP tensors (gate and up rows, down columns, biases when
present), computed in float64 (`axis_square_sums`); channels are then ranked
by `compiler.geometry.top_channels`.
"""

from __future__ import annotations

import numpy as np

from compiler.geometry import complement

# Byte budget per chunk when reducing a tensor to per-channel sums.
SCORE_CHUNK_BYTES = 1 << 24


# ---- byte-level cuts ----------------------------------------------------------------


def take(
    raw: np.ndarray, axis: int, index: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """raw (*shape, itemsize) with only `index` kept along `axis`: (..., len(index), ..., isz).

    `out`, when given, receives the result (a reusable buffer of exactly that shape).
    """
    assert raw.ndim >= 2 and 0 <= axis < raw.ndim - 1, (raw.shape, axis)
    result = np.take(raw, index, axis=axis, out=out)
    assert result.shape[axis] == len(index)
    return result


def cut_shape(shape: tuple[int, ...], axis: int, n: int) -> tuple[int, ...]:
    """`shape` with axis `axis` resized to n."""
    return (*shape[:axis], n, *shape[axis + 1 :])


def merge(
    kept: np.ndarray,
    removed: np.ndarray,
    axis: int,
    kept_index: np.ndarray,
    size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of the cut: interleave kept and removed parts back into `size` positions."""
    assert kept.shape[axis] == len(kept_index), (kept.shape, axis, len(kept_index))
    assert kept.shape[axis] + removed.shape[axis] == size, (kept.shape, removed.shape, size)
    shape = cut_shape(kept.shape, axis, size)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    assert out.shape == shape, (out.shape, shape)
    where: list[slice | np.ndarray] = [slice(None)] * out.ndim
    where[axis] = kept_index
    out[tuple(where)] = kept
    where[axis] = complement(kept_index, size)
    out[tuple(where)] = removed
    return out


# ---- channel scores -------------------------------------------------------------------


# Safetensors dtypes the CPU metric widens with numpy alone (no torch needed).
_NUMPY_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def axis_square_sums(raw: np.ndarray, dtype: str, axis: int, device: str = "cpu") -> np.ndarray:
    """Sum of squares of a tensor over every axis but `axis`, accumulated in float64.

    `raw` is the tensor's bytes shaped (*shape, itemsize). Rows are widened a
    few MB at a time into one reused buffer, squared in place and summed
    into float64. A 16-bit float squares exactly in float32 (its 8- or 11-bit
    mantissa at most doubles), so BF16/F16 are widened to float32 and wider
    types to float64. On CPU this is numpy alone (bf16 is widened by shifting
    its bits into the top half of a float32); `device` other than cpu (or a
    dtype numpy lacks, such as F8) goes through torch.
    """
    shape = raw.shape[:-1]
    if not shape:
        raw, shape = raw.reshape(1, raw.shape[-1]), (1,)
    if device != "cpu" or (dtype not in _NUMPY_FLOATS and dtype != "BF16"):
        return _torch_square_sums(raw, dtype, axis, device)
    work = np.float32 if dtype in ("BF16", "F16") else np.float64
    rows, row_numel = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, SCORE_CHUNK_BYTES // max(1, row_numel * np.dtype(work).itemsize))
    buf = np.empty(min(step, rows) * row_numel, dtype=work)
    if dtype == "BF16":
        bits = np.empty(buf.shape, dtype=np.uint32)
        source = raw.reshape(rows, -1).view(np.uint16)  # (rows, row_numel)
    else:
        source = raw.reshape(rows, -1).view(_NUMPY_FLOATS[dtype])
    parts: list[np.ndarray] = []
    total = np.zeros(shape[axis], dtype=np.float64) if axis else None
    for start in range(0, rows, step):
        src = source[start : start + step]
        n = src.shape[0]
        if dtype == "BF16":
            b = bits[: n * row_numel].reshape(n, row_numel)
            np.copyto(b, src)  # uint16 -> uint32
            np.left_shift(b, 16, out=b)
            chunk = b.view(np.float32)
        else:
            chunk = buf[: n * row_numel].reshape(n, row_numel)
            np.copyto(chunk, src)
        np.square(chunk, out=chunk)
        chunk = chunk.reshape(n, *shape[1:])
        if axis == 0:
            parts.append(chunk.reshape(n, -1).sum(axis=1, dtype=np.float64))
        else:
            dims = tuple(d for d in range(chunk.ndim) if d != axis)
            assert total is not None
            total += chunk.sum(axis=dims, dtype=np.float64)
    out = np.concatenate(parts) if axis == 0 else total
    assert out is not None and out.shape == (shape[axis],), (out, shape, axis)
    return out


def _torch_square_sums(raw: np.ndarray, dtype: str, axis: int, device: str) -> np.ndarray:
    """`axis_square_sums` with torch (GPU, or dtypes numpy cannot read)."""
    import torch

    from executor.safetensors_io import decode

    t = decode(raw, dtype)
    work = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else torch.float64
    rows = t.shape[0]
    row_numel = t[0].numel() if rows else 1
    step = max(1, SCORE_CHUNK_BYTES // max(1, row_numel * (4 if work == torch.float32 else 8)))
    parts: list[torch.Tensor] = []
    total = torch.zeros(t.shape[axis], dtype=torch.float64, device=device) if axis else None
    for start in range(0, rows, step):
        chunk = t[start : start + step].to(device=device, dtype=work)
        chunk.square_()
        if axis == 0:
            parts.append(chunk.reshape(chunk.shape[0], -1).sum(dim=1, dtype=torch.float64))
        else:
            dims = [d for d in range(chunk.ndim) if d != axis]
            assert total is not None
            total += chunk.sum(dim=dims, dtype=torch.float64)
    out = torch.cat(parts) if axis == 0 else total
    assert out is not None and out.shape == (t.shape[axis],)
    return out.cpu().numpy()
