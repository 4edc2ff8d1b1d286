"""The sliced LM-head loss equals the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch

from executor import lm_loss


def _model(tmp_path, model_type: str, **overrides):
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import make_tiny_model

    path = make_tiny_model(tmp_path, model_type, **overrides)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _weights(model) -> list[torch.nn.Parameter]:
    """The decoder layers' projections: what calibration takes gradients of."""
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    for p in wanted:
        p.requires_grad_(True)
    return wanted


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("gemma3_text", {}),
        ("llama", {"tie_word_embeddings": True}),
    ],
)
def test_loss_and_gradients_equal_the_models_own(tmp_path, monkeypatch, model_type, overrides):
    model = _model(tmp_path, model_type, **overrides)
    assert lm_loss.applies(model)
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    weights = _weights(model)

    reference = model(input_ids=ids, labels=ids, use_cache=False).loss
    reference.backward()
    expected = [p.grad.clone() for p in weights]
    for p in weights:
        p.grad = None

    monkeypatch.setattr(lm_loss, "_chunk_rows", lambda vocab, device: 7)  # 30 tokens: 5 slices
    loss = lm_loss.next_token_loss(model, ids)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for p, g in zip(weights, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_without_gradients_it_only_measures(tmp_path):
    model = _model(tmp_path, "llama")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = lm_loss.next_token_loss(model, ids)
        reference = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_a_transformed_head_keeps_the_models_loss(tmp_path):
    gemma2 = _model(tmp_path, "gemma2", final_logit_softcapping=30.0)
    assert not lm_loss.applies(gemma2)
    gemma2.config.final_logit_softcapping = None
    assert lm_loss.applies(gemma2)


def test_a_trainable_head_is_refused(tmp_path):
    model = _model(tmp_path, "llama")
    model.get_output_embeddings().weight.requires_grad_(True)
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="no gradient for the head"):
        lm_loss.next_token_loss(model, ids)
