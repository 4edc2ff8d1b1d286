"""The architecture table: every layout fact plancc knows, as data.

One entry per family says how its `config.json` maps to the plan's model facts,
which tensors a decoder layer owns, and which axis of each tensor lives in
which *space*. The compiler's cost model counts parameters from these shapes,
`plangen header` reads the facts from them, and the executor slices along the
spaces they name. Adding a layout is adding an entry here plus a test.

Spaces (symbolic dimensions of a tensor):
  hidden      the residual width                       (never sliced)
  q           heads * head_dim, sliced by KV group     (query rows / o columns)
  kv          kv_heads * head_dim, sliced by KV group
  qkv         q + kv + kv fused along one axis (Phi-3 `qkv_proj`)
  head_dim    per-head norms (Qwen3 q_norm/k_norm)     (never sliced)
  ffn         dense MLP channels
  gate_up     2 * ffn fused (Phi-3 `gate_up_proj`)
  experts     routed experts (router rows)
  expert_ffn  channels of one routed expert
  expert_gate_up  2 * expert_ffn fused (experts stored fused: `experts.gate_up_proj`)
  shared_ffn  channels of the shared expert
  vocab       embedding rows                           (never sliced)
  one         a literal 1 (Qwen2-MoE `shared_expert_gate`)
  Multi-head latent attention (DeepSeek-V3, Kimi-K2; kept whole, never sliced):
  q_lora      the query's low-rank width                (q_a_proj / q_a_layernorm)
  kv_lora     the key-value latent width                (kv_a_layernorm, kv_b_proj input)
  kv_a        kv_lora + rope_dim                        (kv_a_proj_with_mqa)
  mla_q       heads * (nope_dim + rope_dim)             (q_b_proj)
  mla_kv      heads * (nope_dim + v_dim)                (kv_b_proj)
  mla_o       heads * v_dim                             (o_proj input)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SPACES = (
    "hidden",
    "q",
    "kv",
    "qkv",
    "head_dim",
    "ffn",
    "gate_up",
    "experts",
    "expert_ffn",
    "expert_gate_up",
    "shared_ffn",
    "vocab",
    "one",
    "q_lora",
    "kv_lora",
    "kv_a",
    "mla_q",
    "mla_kv",
    "mla_o",
)
# Spaces a plan can narrow attention by; a family with none of them (MLA) keeps
# attention whole.
ATTENTION_SLICE_SPACES = ("q", "kv", "qkv")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layer (name relative to the layer prefix) or of the model.

    `dims` names the space of each axis, outermost first, as stored on disk
    (`nn.Linear` weights are (out_features, in_features)). `when` names a
    boolean model fact that must hold for the tensor to exist (e.g. `qkv_bias`,
    `untied`). `{e}` in a name is the routed-expert index.
    """

    name: str
    dims: tuple[str, ...]
    when: str | None = None

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.name


@dataclass(frozen=True)
class ConfigKey:
    """How one model fact is read from config.json.

    `keys` are tried in order (families renamed keys over time); `default` is a
    constant or a function of the facts read so far; `convert` maps the raw
    value (Qwen-1 stores twice the real MLP width).
    """

    keys: tuple[str, ...]
    default: Any = None
    convert: Callable[[Any], Any] | None = None
    # When no key holds it: computed from the whole config (DeepSeek's shared expert
    # width is n_shared_experts x moe_intermediate_size).
    derive: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True)
class Architecture:
    """The layout of one model family."""

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str  # with `{i}` for the layer index
    layers_module: str  # dotted path of the decoder-layer list, for loaders
    facts: Mapping[str, ConfigKey]
    attention: tuple[TensorSpec, ...]
    dense_mlp: tuple[TensorSpec, ...]
    norms: tuple[TensorSpec, ...]
    embeddings: tuple[TensorSpec, ...]
    moe_mlp: tuple[TensorSpec, ...] = ()
    # Which layers of a MoE model are dense, from config.json (None: all MoE).
    dense_layers: Callable[[Mapping[str, Any], int], list[int]] | None = None
    # Per-layer config lists that must follow a depth change (e.g. layer_types).
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)
    moe: bool = False
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attention_sliceable(self) -> bool:
        """Whether KV groups can be dropped (not for multi-head latent attention)."""
        return any(d in ATTENTION_SLICE_SPACES for s in self.attention for d in s.dims)

    def layer_tensors(self, moe_layer: bool) -> tuple[TensorSpec, ...]:
        mlp = self.moe_mlp if moe_layer else self.dense_mlp
        return self.norms + self.attention + mlp

    def layer_pattern(self) -> re.Pattern[str]:
        """Regex of a layer tensor name: group 1 the layer index, group 2 the relative name."""
        prefix = re.escape(self.layer_prefix).replace(re.escape("{i}"), r"(\d+)")
        return re.compile(f"^{prefix}(.+)$")


def _t(name: str, *dims: str, when: str | None = None) -> TensorSpec:
    return TensorSpec(name, tuple(dims), when)


def _head_dim_default(facts: Mapping[str, Any]) -> int | None:
    if facts.get("hidden") and facts.get("heads"):
        return facts["hidden"] // facts["heads"]
    return None


_COMMON_FACTS: dict[str, ConfigKey] = {
    "layers": ConfigKey(("num_hidden_layers", "n_layer", "num_layers")),
    "hidden": ConfigKey(("hidden_size", "n_embd", "d_model")),
    "heads": ConfigKey(("num_attention_heads", "n_head")),
    "kv_heads": ConfigKey(("num_key_value_heads",), default=lambda f: f.get("heads")),
    "head_dim": ConfigKey(("head_dim",), default=_head_dim_default),
    "ffn": ConfigKey(("intermediate_size", "ffn_hidden_size")),
    "vocab": ConfigKey(("vocab_size",)),
    "tied": ConfigKey(("tie_word_embeddings",), default=False),
}

_LLAMA_ATTENTION = (
    _t("self_attn.q_proj.weight", "q", "hidden"),
    _t("self_attn.q_proj.bias", "q", when="qkv_bias"),
    _t("self_attn.k_proj.weight", "kv", "hidden"),
    _t("self_attn.k_proj.bias", "kv", when="qkv_bias"),
    _t("self_attn.v_proj.weight", "kv", "hidden"),
    _t("self_attn.v_proj.bias", "kv", when="qkv_bias"),
    _t("self_attn.o_proj.weight", "hidden", "q"),
    _t("self_attn.o_proj.bias", "hidden", when="o_bias"),
)
_LLAMA_MLP = (
    _t("mlp.gate_proj.weight", "ffn", "hidden"),
    _t("mlp.gate_proj.bias", "ffn", when="mlp_bias"),
    _t("mlp.up_proj.weight", "ffn", "hidden"),
    _t("mlp.up_proj.bias", "ffn", when="mlp_bias"),
    _t("mlp.down_proj.weight", "hidden", "ffn"),
    _t("mlp.down_proj.bias", "hidden", when="mlp_bias"),
)
_LLAMA_NORMS = (
    _t("input_layernorm.weight", "hidden"),
    _t("post_attention_layernorm.weight", "hidden"),
)
_LLAMA_EMBEDDINGS = (
    _t("model.embed_tokens.weight", "vocab", "hidden"),
    _t("model.norm.weight", "hidden"),
    _t("lm_head.weight", "vocab", "hidden", when="untied"),
)
_QK_NORMS = (
    _t("self_attn.q_norm.weight", "head_dim"),
    _t("self_attn.k_norm.weight", "head_dim"),
)
# Gemma-3: a norm before and after both attention and MLP (sandwich norms).
_GEMMA3_NORMS = (
    _t("input_layernorm.weight", "hidden"),
    _t("post_attention_layernorm.weight", "hidden"),
    _t("pre_feedforward_layernorm.weight", "hidden"),
    _t("post_feedforward_layernorm.weight", "hidden"),
)
_EXPERTS = (
    _t("mlp.gate.weight", "experts", "hidden"),
    _t("mlp.experts.{e}.gate_proj.weight", "expert_ffn", "hidden"),
    _t("mlp.experts.{e}.up_proj.weight", "expert_ffn", "hidden"),
    _t("mlp.experts.{e}.down_proj.weight", "hidden", "expert_ffn"),
)


# The other on-disk form of routed experts, transformers 5's own in-memory layout:
# per layer one [experts, 2 * expert_ffn, hidden] gate_up (gate rows, then up) and
# one [experts, hidden, expert_ffn] down, the router as `mlp.gate`. Some checkpoints
# ship it; `checkpoint_form` picks it from the tensor names.
_FUSED_EXPERTS = (
    _t("mlp.gate.weight", "experts", "hidden"),
    _t("mlp.experts.gate_up_proj", "experts", "expert_gate_up", "hidden"),
    _t("mlp.experts.down_proj", "experts", "hidden", "expert_ffn"),
)
FUSED_GATE_UP = _FUSED_EXPERTS[1].name


def fused_experts_form(arch: Architecture) -> Architecture | None:
    """The family with its routed experts (and router) in the fused form, or None for a
    dense family. The shared expert and everything else stay as they are."""
    if not arch.moe:
        return None
    rest = tuple(s for s in arch.moe_mlp if not s.per_expert and s.dims != ("experts", "hidden"))
    return dataclasses.replace(arch, moe_mlp=_FUSED_EXPERTS + rest)


def _bool_key(*keys: str, default: bool = False) -> ConfigKey:
    return ConfigKey(keys, default=default, convert=bool)


def _qwen_moe_dense_layers(config: Mapping[str, Any], layers: int) -> list[int]:
    """Qwen2/3-MoE: a layer is dense when listed in `mlp_only_layers`, when the
    model has no experts, or when `decoder_sparse_step` skips it (transformers'
    own rule in `Qwen2MoeDecoderLayer`). transformers 5 writes a Qwen3-MoE
    expert count as `num_local_experts` (hub checkpoints say `num_experts`), so
    both are read; reading only `num_experts` made every layer look dense.
    """
    only = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    return [i for i in range(layers) if i in only or experts == 0 or (i + 1) % step != 0]


def _llama_like(name: str, model_types: tuple[str, ...], **over: Any) -> Architecture:
    facts = dict(_COMMON_FACTS)
    facts["qkv_bias"] = _bool_key("attention_bias")
    facts["o_bias"] = _bool_key("attention_bias")
    facts["mlp_bias"] = _bool_key("mlp_bias")
    facts.update(over.pop("facts", {}))
    return Architecture(
        name=name,
        model_types=model_types,
        layer_prefix="model.layers.{i}.",
        layers_module="model.layers",
        facts=facts,
        attention=over.pop("attention", _LLAMA_ATTENTION),
        dense_mlp=over.pop("dense_mlp", _LLAMA_MLP),
        norms=over.pop("norms", _LLAMA_NORMS),
        embeddings=over.pop("embeddings", _LLAMA_EMBEDDINGS),
        **over,
    )


# Families whose modeling code hard-codes `bias=False` on the MLP (every one but
# Llama) must not read `mlp_bias` from config.json: a stray key there would
# predict tensors that transformers never creates.
_NO_MLP_BIAS = {"mlp_bias": ConfigKey((), default=False)}
_NO_BIAS = {
    "qkv_bias": ConfigKey((), default=False),
    "o_bias": ConfigKey((), default=False),
    **_NO_MLP_BIAS,
}
# Qwen2 hard-codes q/k/v biases (no config key switches them off); Qwen2-MoE
# reads `qkv_bias` from its config.
_QWEN2_FACTS = {
    "qkv_bias": ConfigKey((), default=True),
    "o_bias": ConfigKey((), default=False),
    **_NO_MLP_BIAS,
}
_QWEN2_MOE_FACTS = {
    **_QWEN2_FACTS,
    "qkv_bias": ConfigKey(("qkv_bias",), default=True, convert=bool),
}
_MOE_FACTS = {
    "experts": ConfigKey(("num_experts", "num_local_experts", "n_routed_experts")),
    "top_k": ConfigKey(("num_experts_per_tok",)),
    "expert_ffn": ConfigKey(("moe_intermediate_size",)),
}

# DeepSeek-V3 / Kimi-K2: multi-head latent attention (kept whole), 256 routed
# experts with a sigmoid router, its `e_score_correction_bias` and group-limited
# selection (`n_group`), shared experts summed in, the first
# `first_k_dense_replace` layers dense.
_MLA_ATTENTION = (
    _t("self_attn.q_a_proj.weight", "q_lora", "hidden"),
    _t("self_attn.q_a_proj.bias", "q_lora", when="qkv_bias"),
    _t("self_attn.q_a_layernorm.weight", "q_lora"),
    _t("self_attn.q_b_proj.weight", "mla_q", "q_lora"),
    _t("self_attn.kv_a_proj_with_mqa.weight", "kv_a", "hidden"),
    _t("self_attn.kv_a_proj_with_mqa.bias", "kv_a", when="qkv_bias"),
    _t("self_attn.kv_a_layernorm.weight", "kv_lora"),
    _t("self_attn.kv_b_proj.weight", "mla_kv", "kv_lora"),
    _t("self_attn.o_proj.weight", "hidden", "mla_o"),
    _t("self_attn.o_proj.bias", "hidden", when="o_bias"),
)
_DEEPSEEK_MOE = (
    _t("mlp.gate.weight", "experts", "hidden"),
    _t("mlp.gate.e_score_correction_bias", "experts"),
    _t("mlp.experts.{e}.gate_proj.weight", "expert_ffn", "hidden"),
    _t("mlp.experts.{e}.up_proj.weight", "expert_ffn", "hidden"),
    _t("mlp.experts.{e}.down_proj.weight", "hidden", "expert_ffn"),
    _t("mlp.shared_experts.gate_proj.weight", "shared_ffn", "hidden"),
    _t("mlp.shared_experts.up_proj.weight", "shared_ffn", "hidden"),
    _t("mlp.shared_experts.down_proj.weight", "hidden", "shared_ffn"),
)


def _deepseek_shared_ffn(config: Mapping[str, Any]) -> int | None:
    shared, width = config.get("n_shared_experts"), config.get("moe_intermediate_size")
    return shared * width if isinstance(shared, int) and isinstance(width, int) else None


def _deepseek_dense_layers(config: Mapping[str, Any], layers: int) -> list[int]:
    """The first `first_k_dense_replace` layers, and those off `moe_layer_freq`."""
    first = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return [i for i in range(layers) if i < first or i % freq != 0]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        _llama_like("llama", ("llama",)),
        _llama_like("mistral", ("mistral",), facts=_NO_BIAS),
        _llama_like("qwen2", ("qwen2",), facts=_QWEN2_FACTS),
        _llama_like(
            "qwen3",
            ("qwen3",),
            norms=_LLAMA_NORMS + _QK_NORMS,
            facts={"o_bias": _bool_key("attention_bias"), **_NO_MLP_BIAS},
        ),
        # Gemma-3 text (gemma-3-1b and the text tower's layout): q/k norms over
        # head_dim (256 on the hub), four norms per block, embeddings tied by
        # default, `layer_types` (sliding / full attention) renumbered on depth
        # changes. Small sizes have a single KV head, so only depth and MLP
        # plans apply to them (dropping the one group is P109).
        _llama_like(
            "gemma3_text",
            ("gemma3_text",),
            norms=_GEMMA3_NORMS + _QK_NORMS,
            facts={
                "tied": ConfigKey(("tie_word_embeddings",), default=True),
                **_NO_MLP_BIAS,
            },
        ),
        _llama_like(
            "phi3",
            ("phi3",),
            attention=(
                _t("self_attn.qkv_proj.weight", "qkv", "hidden"),
                _t("self_attn.o_proj.weight", "hidden", "q"),
            ),
            dense_mlp=(
                _t("mlp.gate_up_proj.weight", "gate_up", "hidden"),
                _t("mlp.down_proj.weight", "hidden", "ffn"),
            ),
            facts=_NO_BIAS,
        ),
        _llama_like(
            "qwen2_moe",
            ("qwen2_moe",),
            moe=True,
            facts={
                **_QWEN2_MOE_FACTS,
                **_MOE_FACTS,
                "shared_ffn": ConfigKey(("shared_expert_intermediate_size",), default=0),
            },
            moe_mlp=(
                *_EXPERTS,
                _t("mlp.shared_expert.gate_proj.weight", "shared_ffn", "hidden"),
                _t("mlp.shared_expert.up_proj.weight", "shared_ffn", "hidden"),
                _t("mlp.shared_expert.down_proj.weight", "hidden", "shared_ffn"),
                _t("mlp.shared_expert_gate.weight", "one", "hidden"),
            ),
            dense_layers=_qwen_moe_dense_layers,
        ),
        _llama_like(
            "qwen3_moe",
            ("qwen3_moe",),
            moe=True,
            norms=_LLAMA_NORMS + _QK_NORMS,
            facts={**_MOE_FACTS, "o_bias": _bool_key("attention_bias"), **_NO_MLP_BIAS},
            moe_mlp=_EXPERTS,
            dense_layers=_qwen_moe_dense_layers,
        ),
        _llama_like(
            "mixtral",
            ("mixtral",),
            moe=True,
            facts={
                **_MOE_FACTS,
                "expert_ffn": ConfigKey(("intermediate_size",)),
                **_NO_BIAS,
            },
            moe_mlp=(
                _t("block_sparse_moe.gate.weight", "experts", "hidden"),
                _t("block_sparse_moe.experts.{e}.w1.weight", "expert_ffn", "hidden"),
                _t("block_sparse_moe.experts.{e}.w3.weight", "expert_ffn", "hidden"),
                _t("block_sparse_moe.experts.{e}.w2.weight", "hidden", "expert_ffn"),
            ),
            dense_layers=lambda config, layers: [],
        ),
        _llama_like(
            "deepseek_v3",
            ("deepseek_v3", "kimi_k2"),
            moe=True,
            attention=_MLA_ATTENTION,
            facts={
                **_MOE_FACTS,
                **_NO_MLP_BIAS,  # `attention_bias` gives q_a, kv_a and o biases
                "shared_ffn": ConfigKey((), default=0, derive=_deepseek_shared_ffn),
                "expert_groups": ConfigKey(("n_group",)),
                "q_lora": ConfigKey(("q_lora_rank",)),
                "kv_lora": ConfigKey(("kv_lora_rank",)),
                "rope_dim": ConfigKey(("qk_rope_head_dim",)),
                "nope_dim": ConfigKey(("qk_nope_head_dim",)),
                "v_dim": ConfigKey(("v_head_dim",)),
            },
            moe_mlp=_DEEPSEEK_MOE,
            dense_layers=_deepseek_dense_layers,
            notes="multi-head latent attention is kept whole: plans drop layers and experts",
        ),
        _llama_like(
            "olmoe",
            ("olmoe",),
            moe=True,
            norms=(
                *_LLAMA_NORMS,
                _t("self_attn.q_norm.weight", "q"),
                _t("self_attn.k_norm.weight", "kv"),
            ),
            facts={
                **_MOE_FACTS,
                "expert_ffn": ConfigKey(("intermediate_size",)),
                "qkv_bias": _bool_key("attention_bias"),
                "o_bias": _bool_key("attention_bias"),
                **_NO_MLP_BIAS,
            },
            moe_mlp=_EXPERTS,
            dense_layers=lambda config, layers: [],
        ),
        Architecture(
            name="qwen",
            model_types=("qwen",),
            layer_prefix="transformer.h.{i}.",
            layers_module="transformer.h",
            facts={
                **_COMMON_FACTS,
                "kv_heads": ConfigKey((), default=lambda f: f.get("heads")),
                "head_dim": ConfigKey(("kv_channels",), default=_head_dim_default),
                # Qwen-1 states twice the width of w1/w2 (they split it in two).
                "ffn": ConfigKey(("intermediate_size",), convert=lambda v: int(v) // 2),
                "tied": ConfigKey(("tie_word_embeddings",), default=False),
                "qkv_bias": ConfigKey((), default=True),
                "o_bias": ConfigKey((), default=False),
            },
            norms=(_t("ln_1.weight", "hidden"), _t("ln_2.weight", "hidden")),
            attention=(
                _t("attn.c_attn.weight", "qkv", "hidden"),
                _t("attn.c_attn.bias", "qkv", when="qkv_bias"),
                _t("attn.c_proj.weight", "hidden", "q"),
            ),
            dense_mlp=(
                _t("mlp.w1.weight", "ffn", "hidden"),
                _t("mlp.w2.weight", "ffn", "hidden"),
                _t("mlp.c_proj.weight", "hidden", "ffn"),
            ),
            embeddings=(
                _t("transformer.wte.weight", "vocab", "hidden"),
                _t("transformer.ln_f.weight", "hidden"),
                _t("lm_head.weight", "vocab", "hidden", when="untied"),
            ),
            per_layer_config_lists=(),
            notes="remote code (trust_remote_code); MHA only",
        ),
    )
}

ARCH_NAMES = tuple(sorted(ARCHITECTURES))


def architecture_for_model_type(model_type: str) -> Architecture | None:
    """The table entry whose `model_types` include a config's `model_type`."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    return None


def read_facts(arch: Architecture, config: Mapping[str, Any]) -> dict[str, Any]:
    """Model facts (plan vocabulary) from a config.json mapping, in table order."""
    facts: dict[str, Any] = {}
    for fact, key in arch.facts.items():
        value = next((config[k] for k in key.keys if config.get(k) is not None), None)
        if value is None and key.derive is not None:
            value = key.derive(config)
        if value is None:
            value = key.default(facts) if callable(key.default) else key.default
        elif key.convert is not None:
            value = key.convert(value)
        if value is not None:
            facts[fact] = value
    if arch.dense_layers is not None and "layers" in facts:
        dense = arch.dense_layers(config, facts["layers"])
        if dense:
            facts["dense_layers"] = tuple(dense)
    return facts


def renumber_layer_config(
    arch: Architecture, config: Mapping[str, Any], kept: list[int] | tuple[int, ...]
) -> dict[str, Any]:
    """The config keys that describe layers one by one, after a depth change.

    `kept` lists the original layer index of every new layer, in new order.
    Returns only the keys that change (the caller merges them):
      * `num_hidden_layers` (or the family's spelling) = len(kept);
      * every list in `per_layer_config_lists` (e.g. `layer_types`) that has one
        entry per original layer keeps the kept layers' entries;
      * Qwen's `max_window_layers` (layers below it use full attention) becomes
        the number of kept layers that were below it, so every kept layer keeps
        its attention kind;
      * MoE families with `dense_layers`: `mlp_only_layers` lists the new
        indices of the kept dense layers and `decoder_sparse_step` becomes 1,
        because the step rule of the original numbering does not survive
        renumbering.
    """
    n = next((config[k] for k in arch.facts["layers"].keys if isinstance(config.get(k), int)), None)
    out: dict[str, Any] = {}
    layers_key = next((k for k in arch.facts["layers"].keys if k in config), None)
    if layers_key is not None:
        out[layers_key] = len(kept)
    for key in arch.per_layer_config_lists:
        value = config.get(key)
        if isinstance(value, list) and n is not None and len(value) == n:
            out[key] = [value[i] for i in kept]
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        out["max_window_layers"] = sum(1 for i in kept if i < mwl)
    sparse_keys = ("mlp_only_layers", "decoder_sparse_step")
    if arch.dense_layers is not None and n is not None and any(k in config for k in sparse_keys):
        dense = set(arch.dense_layers(config, n))
        out["mlp_only_layers"] = [new for new, i in enumerate(kept) if i in dense]
        if "decoder_sparse_step" in config:
            out["decoder_sparse_step"] = 1
    return out


def mla_sizes(facts: Mapping[str, Any], heads: int | None) -> dict[str, int | None]:
    """The multi-head latent attention spaces (see compiler.architectures), or None."""
    v = {k: facts.get(k) for k in ("q_lora", "kv_lora", "rope_dim", "nope_dim", "v_dim")}
    if heads is None or any(not isinstance(x, int) or isinstance(x, bool) for x in v.values()):
        return {s: None for s in ("q_lora", "kv_lora", "kv_a", "mla_q", "mla_kv", "mla_o")}
    return {
        "q_lora": v["q_lora"],
        "kv_lora": v["kv_lora"],
        "kv_a": v["kv_lora"] + v["rope_dim"],
        "mla_q": heads * (v["nope_dim"] + v["rope_dim"]),
        "mla_kv": heads * (v["nope_dim"] + v["v_dim"]),
        "mla_o": heads * v["v_dim"],
    }
