"""Which positions of each tensor axis survive a plan, and the byte-level cuts.

The architecture table names the *space* of every tensor axis (see
`compiler.architectures`); a layer's `LayerSelection` says which KV groups and
which MLP channels it keeps; `space_indices` turns the two into the kept
positions along that axis. Everything here works on raw bytes shaped
(*shape, itemsize), so slicing and merging are exact for every dtype.

KV groups: group g is KV head g plus the query heads that read it,
g*r .. (g+1)*r - 1 with r = heads / kv_heads. A head h owns rows
h*head_dim .. (h+1)*head_dim - 1 of q_proj (and those columns of o_proj); KV
head g owns the same rows of k_proj and v_proj. A fused `qkv` axis is
[q | k | v] and a fused `gate_up` axis is [gate | up]; each part is sliced
like its unfused tensor.

The `magnitude` metric (the default `by`): channel c of a dense MLP scores
sqrt(sum of the squares of every weight whose ffn coordinate is c), over all
of the layer's MLP tensors (gate and up rows, down columns, biases when
present), computed in float64. Channels are ranked by score, highest first;
equal scores go to the lower index (a stable sort), so apply is
deterministic. Kept channels stay in their original order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compiler.facts import ModelFacts

# Spaces the executor can cut (the rest are never sliced by a plan).
SLICEABLE = ("q", "kv", "qkv", "ffn", "gate_up")
# Spaces whose positions are MLP channels, and how many channel-sized parts they hold.
FFN_PARTS = {"ffn": 1, "gate_up": 2}
# Byte budget per chunk when reducing a tensor to per-channel sums.
SCORE_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class Geometry:
    """The original sizes the spaces are made of."""

    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @staticmethod
    def of(facts: ModelFacts) -> Geometry:
        return Geometry(facts.heads or 0, facts.kv_heads or 0, facts.head_dim or 0, facts.ffn or 0)

    @property
    def ratio(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 1

    def size(self, space: str) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q": q, "kv": kv, "qkv": q + 2 * kv, "ffn": self.ffn, "gate_up": 2 * self.ffn}[
            space
        ]


@dataclass(frozen=True)
class LayerSelection:
    """What one kept layer keeps; None means everything (the axis is not cut)."""

    groups: tuple[int, ...] | None = None
    ffn: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, list[int] | None]:
        return {
            "groups": list(self.groups) if self.groups is not None else None,
            "ffn": list(self.ffn) if self.ffn is not None else None,
        }


def _head_rows(heads: Sequence[int], head_dim: int) -> np.ndarray:
    """Rows of every listed head, in order: h*head_dim .. (h+1)*head_dim - 1."""
    if not len(heads):
        return np.zeros(0, dtype=np.int64)
    return (np.asarray(heads, dtype=np.int64)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def space_indices(space: str, sel: LayerSelection, geom: Geometry) -> np.ndarray | None:
    """Kept positions along an axis of `space` (sorted), or None when nothing is cut."""
    if space in ("q", "kv", "qkv"):
        if sel.groups is None:
            return None
        r, hd = geom.ratio, geom.head_dim
        q_rows = _head_rows([g * r + j for g in sel.groups for j in range(r)], hd)
        kv_rows = _head_rows(sel.groups, hd)
        if space == "q":
            return q_rows
        if space == "kv":
            return kv_rows
        q_size, kv_size = geom.size("q"), geom.size("kv")
        return np.concatenate([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
    if space in FFN_PARTS:
        if sel.ffn is None:
            return None
        ch = np.asarray(sel.ffn, dtype=np.int64)
        return np.concatenate([p * geom.ffn + ch for p in range(FFN_PARTS[space])])
    return None


def complement(kept: np.ndarray, size: int) -> np.ndarray:
    """Positions of 0..size-1 not in `kept`, sorted."""
    mask = np.ones(size, dtype=bool)
    mask[kept] = False
    return np.nonzero(mask)[0]


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


def fold_channels(sums: np.ndarray, space: str, ffn: int) -> np.ndarray:
    """Per-position sums of an ffn-family axis folded to per-channel sums (gate_up → ffn)."""
    parts = FFN_PARTS[space]
    assert sums.shape == (parts * ffn,), (sums.shape, space, ffn)
    return sums.reshape(parts, ffn).sum(axis=0)


def top_channels(scores: np.ndarray, n: int) -> tuple[int, ...]:
    """The n best channels (highest score, ties to the lower index), in original order."""
    scores = np.asarray(scores, dtype=np.float64)
    assert scores.ndim == 1 and 0 < n <= scores.shape[0], (scores.shape, n)
    order = np.argsort(-scores, kind="stable")
    return tuple(int(i) for i in np.sort(order[:n]))


def selection_json(sel: Mapping[int, LayerSelection]) -> dict[str, dict[str, list[int] | None]]:
    return {str(i): s.to_json() for i, s in sorted(sel.items())}
