"""Which positions of each tensor axis a plan keeps: the compiler's resolved meaning of a cut.

The architecture table names the *space* of every tensor axis (see
`compiler.architectures`); a layer's `LayerSelection` says which KV groups and
which MLP channels it keeps; `space_indices` turns the two into the kept
positions along that axis. Pure index logic: the executor does the byte-level
cuts (`executor.slicing` moves the bytes), the planner scores and chooses with the same rules.

KV groups: group g is KV head g plus the query heads that read it,
g*r .. (g+1)*r - 1 with r = heads / kv_heads. A head h owns rows
h*head_dim .. (h+1)*head_dim - 1 of q_proj (and those columns of o_proj); KV
head g owns the same rows of k_proj and v_proj. A fused `qkv` axis is
[q | k | v] and a fused `gate_up` axis is [gate | up]; each part is sliced
like its unfused tensor.

Channels are ranked by score, highest first; equal scores go to the lower
index (a stable sort), so apply is deterministic. Kept channels stay in their
original order (`top_channels`).
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
