"""Depth scores equal a direct computation (numpy, float64) on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plangen.metrics.depth import DepthStats

L, DIM = 4, 8


def _batches() -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for batch, seq in ((2, 5), (3, 4)):
        hidden = [torch.randn(batch, seq, DIM, generator=g) for _ in range(L + 1)]
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[0, -2:] = False  # a padded sequence: its last real token is at seq - 3
        out.append((hidden, mask))
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_scores_equal_a_direct_computation() -> None:
    stats = DepthStats(L)
    batches = _batches()
    for hidden, mask in batches:
        stats.update(hidden, mask)
    # Reference: every real token for BI, each sequence's last real token for angles.
    cos_sum, tokens = np.zeros(L), 0
    last: list[list[np.ndarray]] = [[] for _ in range(L + 1)]
    for hidden, mask in batches:
        h = [x.double().numpy() for x in hidden]
        m = mask.numpy()
        for b in range(m.shape[0]):
            real = np.flatnonzero(m[b])
            for t in real:
                tokens += 1
                for k in range(L):
                    cos_sum[k] += _cos(h[k][b, t], h[k + 1][b, t])
            for k in range(L + 1):
                last[k].append(h[k][b, real[-1]])
    assert stats.block_influence() == pytest.approx(list(1 - cos_sum / tokens), abs=1e-12)
    dist = stats.angular_distance()
    assert set(dist) == {(s, n) for n in range(1, L) for s in range(L - n + 1)}
    for (s, n), d in dist.items():
        want = np.mean(
            [
                math.acos(np.clip(_cos(a, b), -1, 1)) / math.pi
                for a, b in zip(last[s], last[s + n], strict=True)
            ]
        )
        assert d == pytest.approx(want, abs=1e-12)


def test_an_identity_layer_scores_zero_and_is_chosen() -> None:
    hidden, mask = _batches()[0]
    hidden[2] = hidden[1].clone()  # layer 1 changes nothing
    stats = DepthStats(L)
    stats.update(hidden, mask)
    assert stats.block_influence()[1] == pytest.approx(0.0, abs=1e-12)
    assert stats.best_block(1) == (1, pytest.approx(0.0, abs=1e-7))
    # The last layer is never a candidate unless asked.
    hidden, mask = _batches()[0]
    hidden[4] = hidden[3].clone()  # only the last layer (3) changes nothing
    stats = DepthStats(L)
    stats.update(hidden, mask)
    assert stats.best_block(1)[0] != 3
    assert stats.best_block(1, keep_last=False) == (3, pytest.approx(0.0, abs=1e-7))


def test_wrong_number_of_states_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 5 hidden states, got 4"):
        DepthStats(L).update([torch.zeros(1, 2, DIM)] * 4)
    with pytest.raises(ValueError, match="no calibration batch"):
        DepthStats(L).block_influence()
