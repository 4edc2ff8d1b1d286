"""Next-token loss through the LM head, a slice of tokens at a time.

`model(labels=...)` materialises the logits of every token (batch x seqlen x
vocab, 400 MB in fp32 for four 512-token windows of a 49k vocabulary, four
times that for Llama-3's), takes a log-softmax over them and keeps it for the
backward. On a CPU that log-softmax and its backward cost as much as a fifth
of a calibration batch; on a GPU the logits are what stops an 8B gradient pass
from fitting. Here the LM head runs over slices of tokens; each slice's
logits become its loss and, when gradients are wanted, the loss's gradient
with respect to the final hidden state, computed on the spot (softmax minus
one-hot, times the head's weight), and the slice is freed. The backward then
only hands that stored gradient to the decoder layers. Same loss, same
gradients, up to float rounding; tests compare both with the model's own.

This needs the head to be a plain bias-free linear map of the last hidden
state. `applies()` says when it is; otherwise `next_token_loss` returns the
model's own loss, so callers need not ask.

One implementation serves the whole project: the planner's `mean_loss` and
calibration pass call `next_token_loss` on a full model; the layer-wise walk
(`executor.layerwise`) calls `sliced` and `SlicedHeadLoss` on its final states,
so the two give the same loss and the same gradients bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

# Attributes with which a config changes the logits after the head's matmul
# (Gemma-2 soft-capping, Cohere / Granite scaling): such a model keeps its own loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_head(head: Any, config: Any) -> bool:
    """True when `head` is a bias-free linear map and `config` transforms nothing after it:
    the logits are exactly `hidden @ head.weight.T`."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def applies(model: Any) -> bool:
    """True when the logits are exactly `last_hidden_state @ head.weight.T`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return plain_head(head, getattr(model, "config", None)) and hasattr(model, "base_model")


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per slice: logits of at most 4M floats on a CPU (16 MB, so the one
    buffer stays in cache-friendly, allocator-reused memory), 64M on an accelerator."""
    budget = 1 << (22 if device.type == "cpu" else 26)
    return max(16, budget // max(vocab, 1))


def sliced(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean loss of `hidden` [N, H] against `labels` [N] through `weight` [V, H] and,
    with `want_grad`, its gradient with respect to `hidden`.

    One logits buffer serves every slice, and the softmax is taken in place in
    it (shift by the row maximum, exp, normalise): no slice allocates anything
    of vocabulary size."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = min(_chunk_rows(vocab, hidden.device), max(n, 1))
    grad = torch.empty_like(hidden) if want_grad else None
    buffer = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
    head = weight.t()
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, n, rows):
        h = hidden[s : s + rows]
        y = labels[s : s + rows]
        logits = buffer[: len(y)]
        if h.dtype == torch.float32 and weight.dtype == torch.float32:
            torch.mm(h, head, out=logits)
        else:
            logits.copy_(h @ head)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        target = logits.gather(1, y[:, None]).squeeze(1)
        sums = logits.exp_().sum(dim=-1)
        total += (sums.log() - target).sum(dtype=torch.float64)  # log-sum-exp minus target
        if grad is not None:
            probs = logits.div_(sums[:, None])  # softmax
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad[s : s + rows] = (probs.to(weight.dtype) @ weight).div_(n)
    return (total / n).to(torch.float32), grad


class SlicedHeadLoss(torch.autograd.Function):
    """The sliced loss as an autograd node whose backward hands over the stored gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> Any:
        loss, grad = sliced(hidden, weight, labels, want_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> Any:
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None


def next_token_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of `ids` [B, T] (every position after the first predicted),
    differentiable with respect to the decoder layers' weights: sliced when `applies`,
    the model's own loss otherwise."""
    if not applies(model):
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    shifted = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    weight = model.get_output_embeddings().weight
    if not (torch.is_grad_enabled() and shifted.requires_grad):
        return sliced(shifted, weight, labels, want_grad=False)[0]
    if weight.requires_grad:
        raise ValueError(
            "the sliced head loss gives no gradient for the head's weight: freeze it "
            "(calibration only takes gradients of the decoder layers)"
        )
    return SlicedHeadLoss.apply(shifted, weight, labels)
