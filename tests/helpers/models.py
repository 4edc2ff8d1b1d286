"""Tiny random checkpoints of every supported layout, tokenizers for them, and forward helpers.

Tiny models are built from transformers config classes and written with
`save_pretrained`, so tests see exactly the files a real checkpoint of that
family has (names, shapes, config keys), at a few hundred kilobytes. Builders
are plain functions taking a directory, used directly or through the
`tiny_model` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

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


# ---- running a model ----------------------------------------------------------------


def tokens(vocab: int = 128, length: int = 12, seed: int = 0) -> Any:
    """Two random windows of `length` token ids in [3, vocab)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, length), generator=g)


def logits(model: Any, ids: Any) -> Any:
    """The model's logits for `ids`, without a cache or gradients."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def load_original(model_dir: Path) -> Any:
    """The checkpoint as stock transformers loads it, in fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


@contextmanager
def hooked(
    model: Any,
    identity: tuple[int, ...] = (),
    zero_heads: dict[int, list[int]] | None = None,
    set_channels: dict[int, tuple[np.ndarray, torch.Tensor | None]] | None = None,
) -> Iterator[Any]:
    """The original model with layers skipped, heads zeroed, MLP channels zeroed or set."""
    import torch

    handles = []
    layers = model.model.layers
    head_dim = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else (model.config.hidden_size // model.config.num_attention_heads)
    )

    def skip(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for i in identity:
        handles.append(layers[i].register_forward_hook(skip, with_kwargs=True))
    for i, heads in (zero_heads or {}).items():

        def zero(module: Any, args: tuple, heads: list[int] = heads) -> tuple:
            x = args[0].clone()
            for h in heads:
                x[..., h * head_dim : (h + 1) * head_dim] = 0
            return (x,)

        handles.append(layers[i].self_attn.o_proj.register_forward_pre_hook(zero))
    for i, (removed, values) in (set_channels or {}).items():

        def setc(module: Any, args: tuple, removed: Any = removed, values: Any = values) -> tuple:
            x = args[0].clone()
            idx = torch.as_tensor(removed)
            x[..., idx] = 0 if values is None else values[idx].to(x.dtype)
            return (x,)

        handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(setc))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def fused_copy(model: Path, tmp_path: Path) -> Path:
    """The same checkpoint with its experts stored fused, as transformers 5 holds them
    in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])."""
    from safetensors.torch import save_file

    ref = load_original(model)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    out = tmp_path / f"{model.name}-fused"
    shutil.copytree(model, out)
    (out / "model.safetensors").unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
