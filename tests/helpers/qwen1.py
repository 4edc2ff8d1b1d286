"""A hand-written tiny Qwen-1 checkpoint (`arch qwen`, remote code).

Stock transformers cannot build Qwen-1 (`QWenLMHeadModel` is remote code), so the
checkpoint is written tensor by tensor with the names and shapes of the upstream
modeling_qwen.py (see tests/executor/test_qwen1.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

LAYERS, HIDDEN, HEADS, HEAD_DIM, FFN2, VOCAB = 3, 64, 4, 16, 128, 96
CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
    "model_type": "qwen",
    "num_hidden_layers": LAYERS,
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "kv_channels": HEAD_DIM,
    "intermediate_size": 2 * FFN2,  # Qwen-1 states twice the w1/w2 width
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "layer_norm_epsilon": 1e-6,
    "max_position_embeddings": 64,
    "seq_length": 64,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "no_bias": True,
}


def qwen1_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (VOCAB, HIDDEN),
        "transformer.ln_f.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (HIDDEN,),
                p + "attn.c_attn.weight": (3 * HIDDEN, HIDDEN),
                p + "attn.c_attn.bias": (3 * HIDDEN,),
                p + "attn.c_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                p + "ln_2.weight": (HIDDEN,),
                p + "mlp.w1.weight": (FFN2, HIDDEN),
                p + "mlp.w2.weight": (FFN2, HIDDEN),
                p + "mlp.c_proj.weight": (HIDDEN, FFN2),
            }
        )
    return shapes


def write_qwen1(d: Path) -> Path:
    """Write the checkpoint (config.json, model.safetensors; seeded) into `d`; return `d`."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
    rng = np.random.default_rng(0)
    tensors = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in sorted(qwen1_shapes().items())
    }
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
