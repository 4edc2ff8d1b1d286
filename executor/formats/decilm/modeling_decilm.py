"""Nemotron-NAS (DeciLM) model for transformers, as plancc writes it next to config.json.

Loaded by `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
on a machine without plancc: it imports only torch and transformers (and its
sibling configuration file, relatively). NVIDIA's own hub code needs
transformers 4.4x internals; this one is built from the transformers 5 Llama
blocks (attention, MLP, RMSNorm, rotary embedding, cache and mask helpers),
so a layer computes exactly what a Llama layer of the same widths computes.

Each decoder layer builds its attention and MLP from a *view* of the global
config that overrides only that layer's KV-head count and MLP width; every
other attribute (including the attention implementation chosen at load time)
is read live from the global config.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_decilm import DeciLMConfig


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's width formula (vLLM, llama.cpp and NVIDIA use the same)."""
    return _find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def ffn_width(ffn: Any, hidden_size: int) -> int:
    """A block's MLP width, read as vLLM reads it: `ffn_mult` whenever it exists."""
    if hasattr(ffn, "ffn_mult"):
        return ffn_mult_to_intermediate_size(ffn.ffn_mult, hidden_size)
    return int(ffn.intermediate_size)


class _LayerView:
    """The global config with a few attributes overridden for one layer."""

    def __init__(self, base: DeciLMConfig, **overrides: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = overrides

    def __getattr__(self, name: str) -> Any:
        overrides = self.__dict__["_overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_base"], name)


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals; either sub-block may be a no-op."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        block = config.block_configs[layer_idx]
        if block.attention.replace_with_linear or block.ffn.replace_with_linear:
            raise ValueError(f"layer {layer_idx}: replace_with_linear is not supported")
        self.attention_no_op = bool(block.attention.no_op)
        self.ffn_no_op = bool(block.ffn.no_op)
        if not self.attention_no_op:
            kv = config.num_attention_heads // block.attention.n_heads_in_group
            qkv_bias = getattr(config, "qkv_bias", None)
            o_bias = bool(getattr(config, "attention_bias", False))
            view = _LayerView(
                config,
                num_key_value_heads=kv,
                attention_bias=o_bias if qkv_bias is None else bool(qkv_bias),
            )
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = LlamaAttention(view, layer_idx)
            if self.self_attn.o_proj.bias is not None and not o_bias:
                out_features, in_features = self.self_attn.o_proj.weight.shape
                self.self_attn.o_proj = nn.Linear(in_features, out_features, bias=False)
        if not self.ffn_no_op:
            view = _LayerView(
                config,
                intermediate_size=ffn_width(block.ffn, config.hidden_size),
                hidden_act=getattr(block.ffn, "hidden_act", config.hidden_act),
            )
            self.post_attention_layernorm = LlamaRMSNorm(
                config.hidden_size, eps=config.rms_norm_eps
            )
            self.mlp = LlamaMLP(view)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.attention_no_op:
            residual = hidden_states
            attended, _ = self.self_attn(
                self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                **kwargs,
            )
            hidden_states = residual + attended
        if not self.ffn_no_op:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
            position_ids = position_ids.unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
