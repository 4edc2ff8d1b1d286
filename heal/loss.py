"""The training objective: next-token loss, or distillation from the original model.

Distillation is Hinton's: KL(teacher ‖ student) between both next-token
distributions at temperature T, times T² so its gradients keep the LM loss's
scale, optionally mixed with the LM loss (`kd_weight`). The teacher's logits
are computed per batch under `no_grad`; with `topk`, only the teacher's k most
likely tokens enter (both distributions renormalized over them), which is what
a cache of teacher outputs would hold and keeps the teacher's part small.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `logits` [B, T, V] on `ids` [B, T]."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, topk: int = 0
) -> torch.Tensor:
    """T² · mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T)); zero when
    the two are equal. With `topk`, the teacher's top-k tokens only."""
    s = student[:, :-1].float() / temperature
    t = teacher[:, :-1].float() / temperature
    if topk:  # both distributions over the teacher's top-k tokens
        t, index = t.topk(min(topk, t.shape[-1]), dim=-1)
        s = s.gather(-1, index)
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


def objective(
    model: Any,
    ids: torch.Tensor,
    teacher: Any | None,
    kd_weight: float,
    temperature: float,
    topk: int = 0,
) -> tuple[torch.Tensor, float]:
    """(the loss to minimize, its LM part in nats, for the curve)."""
    logits = model(input_ids=ids, use_cache=False).logits
    lm = lm_loss(logits, ids)
    if teacher is None or kd_weight == 0.0:
        return lm, float(lm.detach())
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    kd = kd_loss(logits, t_logits, temperature, topk)
    return kd_weight * kd + (1.0 - kd_weight) * lm, float(lm.detach())
