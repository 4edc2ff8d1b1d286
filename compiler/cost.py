"""The cost model: parameters, FLOPs per token and KV-cache bytes per token.

Counts come from the architecture table's tensor shapes evaluated with each
layer's resolved widths, so they agree with what the executor will write.
Conventions (printed with every report):
  * parameters: every tensor of the checkpoint (tied embeddings once);
  * FLOPs/token: 2 x the matrix-multiply weights one token passes through
    (attention projections, MLP or router + top_k routed experts + shared
    expert, and the LM head); attention scores are excluded because they grow
    with the context, not with the plan;
  * KV cache: K and V of every kept layer, 16-bit elements.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from compiler.architectures import Architecture, TensorSpec, mla_sizes
from compiler.cache import read_json, write_json
from compiler.facts import ModelFacts
from compiler.ir import Plan
from compiler.resolve import LayerPlan, ResolvedPlan, resolve

KV_BYTES = 2  # fp16 / bf16 cache elements


def space_sizes(facts: ModelFacts, layer: LayerPlan | None = None) -> dict[str, int]:
    """Size of every space for one layer (`layer=None`: the original model)."""
    hd = facts.head_dim or 0
    heads = layer.heads_kept(facts) if layer else facts.heads or 0
    kv = len(layer.groups_kept) if layer else facts.kv_heads or 0
    ffn = layer.ffn.width if layer and layer.ffn else facts.ffn or 0
    return {
        "hidden": facts.hidden or 0,
        "q": heads * hd,
        "kv": kv * hd,
        "qkv": (heads + 2 * kv) * hd,
        "head_dim": hd,
        "ffn": ffn,
        "gate_up": 2 * ffn,
        "experts": len(layer.experts_kept) if layer else facts.experts or 0,
        "expert_ffn": layer.expert_ffn.width
        if layer and layer.expert_ffn
        else facts.expert_ffn or 0,
        "shared_ffn": layer.shared_ffn.width
        if layer and layer.shared_ffn
        else facts.shared_ffn or 0,
        "vocab": facts.vocab or 0,
        "one": 1,
        **{k: v or 0 for k, v in mla_sizes(facts.as_dict(), facts.heads).items()},
    }


def present(spec: TensorSpec, facts: ModelFacts) -> bool:
    """Whether a tensor with a `when` condition exists for these facts."""
    if spec.when is None:
        return True
    if spec.when == "untied":
        return not facts.tied
    return bool(getattr(facts, spec.when, False))


def numel(spec: TensorSpec, sizes: dict[str, int]) -> int:
    return math.prod(sizes[d] for d in spec.dims)


@dataclass(frozen=True)
class LayerCost:
    params: int
    matmul_active: int  # weights one token multiplies by
    kv_bytes: int


@dataclass(frozen=True)
class Cost:
    params: int
    flops_per_token: int
    kv_bytes_per_token: int
    layers: int
    embedding_params_known: bool


def layer_cost(arch: Architecture, facts: ModelFacts, layer: LayerPlan) -> LayerCost:
    if layer.dropped:
        return LayerCost(0, 0, 0)
    sizes = space_sizes(facts, layer)
    params = active = 0
    experts = sizes["experts"]
    active_experts = min(facts.top_k or experts, experts)
    for spec in arch.layer_tensors(layer.moe):
        if not present(spec, facts):
            continue
        count = numel(spec, sizes)
        copies = experts if spec.per_expert else 1
        params += count * copies
        if len(spec.dims) == 2:
            active += count * (active_experts if spec.per_expert else 1)
    # `compensate` adds an output bias where the family had none.
    hidden = sizes["hidden"]
    if layer.attn_compensate and not facts.o_bias:
        params += hidden
    if layer.ffn_compensate and not facts.mlp_bias:
        params += hidden
    kv_bytes = 2 * sizes["kv"] * KV_BYTES
    return LayerCost(params, active, kv_bytes)


def cost(resolved: ResolvedPlan) -> Cost:
    facts = resolved.facts
    arch = facts.arch
    assert arch is not None
    per_layer = [layer_cost(arch, facts, layer) for layer in resolved.layers]
    sizes = space_sizes(facts)
    embed = sum(numel(s, sizes) for s in arch.embeddings if present(s, facts))
    head = (facts.vocab or 0) * (facts.hidden or 0)  # the LM head matmul, tied or not
    return Cost(
        params=embed + sum(c.params for c in per_layer),
        flops_per_token=2 * (head + sum(c.matmul_active for c in per_layer)),
        kv_bytes_per_token=sum(c.kv_bytes for c in per_layer),
        layers=len(resolved.kept),
        embedding_params_known=facts.vocab is not None,
    )


def original(facts: ModelFacts) -> ResolvedPlan:
    """The unpruned model as a resolved plan (the `before` column)."""
    return resolve(Plan(1, None, None, None, None, ()), facts)


# ---- stock loadability -------------------------------------------------------------


@dataclass(frozen=True)
class Loadability:
    stock: bool
    reason: str


LOADABILITY_CACHE = "stock_loadability.json"


@functools.lru_cache(maxsize=64)
def stock_config_verdict(
    model_type: str, hidden: int, heads: int, kv: int, head_dim: int
) -> Loadability:
    """The verdict of transformers' config class on a uniform result's shapes,
    memoized in memory and on disk per transformers version.

    Importing a transformers config class imports torch (about 3 s); the verdict
    depends only on the transformers version and these five values, so it is
    computed once and then read from the cache (`compiler.cache`).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return Loadability(False, "transformers is not installed: cannot tell")
    key = f"transformers {installed}|{model_type}|{hidden}|{heads}|{kv}|{head_dim}"
    cached = read_json(LOADABILITY_CACHE)
    if isinstance(cached.get(key), list) and len(cached[key]) == 2:
        return Loadability(bool(cached[key][0]), str(cached[key][1]))
    verdict = _build_config(model_type, hidden, heads, kv, head_dim)
    cached[key] = [verdict.stock, verdict.reason]
    write_json(LOADABILITY_CACHE, cached)
    return verdict


def _build_config(model_type: str, hidden: int, heads: int, kv: int, head_dim: int) -> Loadability:
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return Loadability(False, "transformers is not installed: cannot tell")
    try:
        class_name = CONFIG_MAPPING[model_type].__name__
    except KeyError:
        return Loadability(False, f"this transformers has no config class for `{model_type}`")
    try:
        config = AutoConfig.for_model(
            model_type,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
        )
        if hasattr(config, "validate"):
            config.validate()
    except Exception as exc:  # the config class's own words are the reason
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Loadability(False, f"not stock-loadable: {class_name} refuses it: {text}")
    return Loadability(
        True,
        f"uniform: stock AutoModelForCausalLM.from_pretrained loads it "
        f"({type(config).__name__} accepts heads {heads}, kv_heads {kv}, head_dim {head_dim}, "
        f"hidden {hidden})",
    )
