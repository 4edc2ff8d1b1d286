"""Tiny checkpoints and token windows for the layer-walk tests (`executor.layerwise`)."""

from __future__ import annotations

from pathlib import Path

import torch

from executor.layerwise import LayerWalk
from tests.helpers.models import make_tiny_model

FAMILIES = ("llama", "qwen2", "gemma3_text", "phi3", "qwen2_moe", "deepseek_v3")
SEQ = 40  # tokens per window; Gemma-3's sliding window is 8 here
SLIDING_WINDOW = 8

# Llama-3-8B-like layers at half width (~125 MB bf16 each): checkpoints larger than a
# memory limit set on a test process, in a few layers.
SMALL_8B_LIKE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 2048,
}


def build(tmp_path: Path, family: str, **over: object) -> Path:
    extra = {"sliding_window": SLIDING_WINDOW} if family.startswith("gemma3") else {}
    return make_tiny_model(
        tmp_path,
        family,
        max_position_embeddings=128,
        initializer_range=0.2,
        **extra,
        **over,
    )


def token_windows(n: int = 5, seq: int = SEQ, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, seq), generator=g).tolist()


def on_meta(module: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def materialized(walk: LayerWalk) -> list[int]:
    return [i for i, layer in enumerate(walk.layers) if not on_meta(layer)]
