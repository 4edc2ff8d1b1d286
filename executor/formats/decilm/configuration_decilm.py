"""Nemotron-NAS (DeciLM) configuration, as plancc writes it next to config.json.

This file is copied into every model plancc writes in the Nemotron-NAS layout
and is loaded from there by `AutoConfig.from_pretrained(dir,
trust_remote_code=True)` (transformers) and by vLLM, whose
`nemotron_nas.py` takes the config object from it. It therefore imports only
transformers and must not import plancc.

vLLM reads `config.block_configs[i]` by attribute (`block.attention.no_op`,
`block.attention.n_heads_in_group`, `block.ffn.no_op`), and takes the
`ffn_mult` formula whenever `hasattr(block.ffn, "ffn_mult")`, falling back to
`block.ffn.intermediate_size` only when that attribute is absent. So each
sub-block becomes an object whose attributes are exactly the keys of its
JSON dict (no `ffn_mult` attribute unless the file has that key), and
`to_dict` gives the dicts back unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig


class SubblockConfig:
    """One sub-block's settings (attention or ffn): the JSON keys as attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class AttentionConfig(SubblockConfig):
    """`no_op`, `replace_with_linear`, `n_heads_in_group` (query heads per KV head)."""


class FFNConfig(SubblockConfig):
    """`no_op`, `replace_with_linear`, and the width: `ffn_mult` or `intermediate_size`."""


class BlockConfig:
    """One decoder layer: `attention` and `ffn` sub-block objects."""

    def __init__(self, attention: Any, ffn: Any) -> None:
        self.attention = (
            attention if isinstance(attention, AttentionConfig) else AttentionConfig(**attention)
        )
        self.ffn = ffn if isinstance(ffn, FFNConfig) else FFNConfig(**ffn)

    @classmethod
    def of(cls, block: Any) -> BlockConfig:
        return block if isinstance(block, BlockConfig) else cls(**block)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockConfig) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


# Llama's defaults for the keys the model reads, for a config.json that omits them
# (as checkpoints saved by older transformers do).
LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}


class DeciLMConfig(PretrainedConfig):
    """A Llama config whose layers differ: `block_configs` holds one BlockConfig per layer.

    `num_key_value_heads` and `intermediate_size` are per layer here (None at
    the top level, as NVIDIA's files have them); every other Llama key is global.
    `qkv_bias` (Qwen2-style: q/k/v biased, o_proj not) overrides `attention_bias`
    for q/k/v, as vLLM's Llama layers read it.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        block_configs: list[Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.block_configs = [BlockConfig.of(b) for b in block_configs or []]
        self.rope_parameters = rope_parameters
        # transformers 5 drops generation keys such as use_cache from unknown kwargs.
        self.use_cache = bool(kwargs.pop("use_cache", True))
        for key, value in LLAMA_DEFAULTS.items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        layers = getattr(self, "num_hidden_layers", None)
        if self.block_configs and layers is not None and len(self.block_configs) != layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries for {layers} layers"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
