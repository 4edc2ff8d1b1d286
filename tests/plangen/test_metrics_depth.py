"""Depth scores equal a direct computation (numpy, float64) on small cases."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_calibration_hooks_read_the_residual_stream(tmp_path: Path) -> None:
    """h[0..L-1] are the decoder layers' inputs (HF's hidden_states) and h[L] the last
    layer's output before the final norm."""
    from transformers import AutoModelForCausalLM

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.calibrate import depth_stats, residual_states
    from tests.helpers.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2", num_hidden_layers=3)
    arch = load_checkpoint_facts(model_dir).arch
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    states = residual_states(model, arch, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(states) == 4
    for k in range(3):
        torch.testing.assert_close(states[k], ref[k], atol=0, rtol=0)
    torch.testing.assert_close(model.model.norm(states[3]), ref[3], atol=1e-6, rtol=0)
    stats = depth_stats(model, arch, ids.tolist(), batch_size=1, progress=False)
    direct = DepthStats(3)
    for row in ids:
        direct.update(residual_states(model, arch, row[None]))
    assert stats.block_influence() == pytest.approx(direct.block_influence(), abs=1e-12)
