"""Depth scores from the residual stream: angular distance and block influence.

Both read `h[l]`, the hidden state entering decoder layer l (`h[L]` leaves the
last layer, before the final norm), and are accumulated batch by batch
(`DepthStats.update`), so the calibration walk never keeps the activations of
every layer:

* Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the
  Deeper Layers"): for a block of n layers starting at l,
  d(l, n) = arccos(cos(h[l], h[l+n])) / π on each sequence's last token,
  averaged over sequences; the block with the smallest d is the one to drop.
  Only last-token states are kept: (L+1) × sequences × hidden.
* Block influence (ShortGPT): BI(l) = 1 − E[cos(h[l], h[l+1])] over every
  token; low influence = a layer that barely changes its input.

Cosines are computed in float64, so the scores do not depend on the dtype the
model runs in beyond the activations themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64, clamped to [-1, 1]."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return (num / den.clamp_min(1e-30)).clamp(-1.0, 1.0)


@dataclass
class DepthStats:
    """Running sums for angular distance and block influence of an L-layer model."""

    layers: int
    _last: list[list[torch.Tensor]] = field(default_factory=list)  # per boundary
    _bi_sum: torch.Tensor | None = None
    _tokens: int = 0
    _rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per batch, per layer
    # Under torchrun (`split`): each batch's token count and layer sums, kept for `settle`.
    split: bool = False
    _pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def update(self, hidden: Any, mask: torch.Tensor | None = None) -> None:
        """One batch: `hidden` has L+1 tensors [batch, seq, dim] (h[0] .. h[L]);
        `mask` [batch, seq] marks real tokens (default: all)."""
        if len(hidden) != self.layers + 1:
            raise ValueError(f"expected {self.layers + 1} hidden states, got {len(hidden)}")
        batch, seq = hidden[0].shape[:2]
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.bool)
        mask = mask.bool()
        last = mask.long().cumsum(1).argmax(1)  # index of each sequence's last real token
        rows = torch.arange(batch)
        if not self._last:
            self._last = [[] for _ in range(self.layers + 1)]
        for k, h in enumerate(hidden):
            self._last[k].append(h[rows, last].detach().double().cpu())
        sums = torch.stack(
            [(_cos(hidden[k], hidden[k + 1]) * mask).sum().cpu() for k in range(self.layers)]
        )
        self._bi_sum = sums if self._bi_sum is None else self._bi_sum + sums
        self._tokens += int(mask.sum())

    def update_layer(
        self,
        k: int,
        b: int,
        h_in: torch.Tensor,
        h_out: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Layer k on batch b, as a layer walk sees it: its input h[k] and output h[k+1].
        The per-layer form of `update`, with the same sums: layers in order, each over
        the batches in order; a batch's layer sums are added once its last layer is seen."""
        batch, seq = h_in.shape[:2]
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.bool)
        mask = mask.bool()
        last = mask.long().cumsum(1).argmax(1)
        rows = torch.arange(batch)
        if not self._last:
            self._last = [[] for _ in range(self.layers + 1)]
        if k == 0:
            self._last[0].append(h_in[rows, last].detach().double().cpu())
            if self.split:
                self._pending.append((int(mask.sum()), torch.empty(0)))
            else:
                self._tokens += int(mask.sum())
        self._last[k + 1].append(h_out[rows, last].detach().double().cpu())
        self._rows.setdefault(b, []).append((_cos(h_in, h_out) * mask).sum().cpu())
        if k == self.layers - 1:
            sums = torch.stack(self._rows.pop(b))
            if self.split:
                self._pending[b] = (self._pending[b][0], sums)
            else:
                self._bi_sum = sums if self._bi_sum is None else self._bi_sum + sums

    def settle(self) -> None:
        """Under torchrun (`split`, this process's batches walked, `b` their local
        index): every process's batches put in global batch order, as one process
        would have added them (a collective: every process calls it)."""
        from executor import distributed

        mine = [
            (tokens, sums, [last[t] for last in self._last])
            for t, (tokens, sums) in enumerate(self._pending)
        ]
        self._pending, self._last = [], [[] for _ in range(self.layers + 1)]

        def add(item: tuple[int, torch.Tensor, list[torch.Tensor]]) -> None:
            tokens, sums, lasts = item
            self._tokens += tokens
            self._bi_sum = sums if self._bi_sum is None else self._bi_sum + sums
            for boundary, vector in zip(self._last, lasts, strict=True):
                boundary.append(vector)

        distributed.replay(mine, add)

    def block_influence(self) -> list[float]:
        """BI(l) for every layer l."""
        if self._bi_sum is None:
            raise ValueError("no calibration batch was seen")
        return [1.0 - float(s) / self._tokens for s in self._bi_sum]

    def angular_distance(self) -> dict[tuple[int, int], float]:
        """d(start, n) for every block of n = 1 .. L-1 layers."""
        if not self._last:
            raise ValueError("no calibration batch was seen")
        last = [torch.cat(parts) for parts in self._last]
        out = {}
        for n in range(1, self.layers):
            for start in range(self.layers - n + 1):
                angle = torch.arccos(_cos(last[start], last[start + n])) / math.pi
                out[(start, n)] = float(angle.mean())
        return out

    def best_block(self, n: int, keep_last: bool = True) -> tuple[int, float]:
        """(start, distance) of the n-layer block with the smallest angular distance;
        with `keep_last`, blocks that include the last layer are not candidates."""
        dist = self.angular_distance()
        starts = range(self.layers - n + (0 if keep_last else 1))
        if not starts:
            raise ValueError(f"no block of {n} layers fits in {self.layers}")
        start = min(starts, key=lambda s: (dist[(s, n)], s))
        return start, dist[(start, n)]
