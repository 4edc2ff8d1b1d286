"""`executor.load`: load any `plancc apply` result, heterogeneous ones included.

A uniform result is an ordinary checkpoint: this is then just
`AutoModelForCausalLM.from_pretrained`. A result whose config carries the
`plancc` key (layers of different widths, `compensate` biases, or widths the
config class refuses; see `executor.configs`), or written in the Nemotron-NAS
layout (`executor.formats.nemotron_nas`: read back as the family's config
with a `plancc` layers record, so the model is the family's own class and the
shipped DeciLM code is never run), is built in three steps:

1. the model is built from config.json (top-level widths: the largest any
   layer has);
2. every decoder layer whose widths differ is rebuilt by the family's own
   decoder-layer class from a copy of the config with that layer's widths,
   so its attention and MLP code see consistent head counts (Phi-3, for one,
   splits its fused qkv by `config.num_attention_heads`); the layer list is
   found through the architecture table's `layers_module`, not a hard-coded
   path;
3. linear layers that gained a bias (`compensate`) get one, then the weights
   are loaded strictly: every tensor of the checkpoint must land in a
   parameter of the same shape.

The result is a normal transformers model: `generate`, `save_pretrained`
(which writes the same tensors back) and the KV cache all work.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compiler.checkpoint import architecture_of, read_config, tensor_index
from executor.family_config import PLANCC_KEY, is_decilm, model_config


def _dtype(config: Any, dtype: Any) -> Any:
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        return getattr(torch, d)
    return d if d is not None else torch.float32


def load(path: str | Path, device: str = "cpu", dtype: Any = None) -> Any:
    """Load a `plancc apply` (or `restore`) result as a transformers causal LM, in eval mode."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = Path(path)
    raw_config = model_config(read_config(path))
    spec = raw_config.get(PLANCC_KEY)
    if not spec:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype_for_stock(dtype))
        return model.to(device).eval()

    arch = architecture_of(raw_config, str(path / "config.json"))
    config = _config_object(raw_config)
    if not is_decilm(read_config(path)):
        # Where the config came from. Not for a Nemotron-NAS directory: readers such as
        # peft re-read `config.__class__.from_pretrained(_name_or_path)`, and the family's
        # class cannot read that config.json.
        config._name_or_path = str(path)
    torch_dtype = _dtype(config, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    layers = model.get_submodule(arch.layers_module)
    records = spec["layers"]
    if len(records) != len(layers):
        raise ValueError(
            f"{path}: config.json `plancc` lists {len(records)} layers, the model has {len(layers)}"
        )
    for j, rec in enumerate(records):
        overrides = rec.get("config", {})
        if all(getattr(config, k, None) == v for k, v in overrides.items()):
            continue
        layer_config = copy.deepcopy(config)
        for k, v in overrides.items():
            setattr(layer_config, k, v)
        layers[j] = type(layers[j])(layer_config, j).to(torch_dtype)

    index = tensor_index(path)
    _add_missing_biases(model, index)
    state: dict[str, torch.Tensor] = {}
    for file in sorted({info.file for info in index.values()}):
        with safe_open(str(path / file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                state[name] = fh.get_tensor(name)
    own = model.state_dict()
    if arch.moe:
        fuse_experts(arch, state, own, range(len(layers)))
    wrong = [
        f"{n}: checkpoint {list(t.shape)}, model {list(own[n].shape)}"
        for n, t in state.items()
        if n in own and own[n].shape != t.shape
    ]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not fit the model: " + "; ".join(wrong[:5]))
    result = model.load_state_dict(state, strict=False)
    tied = {n for n in result.missing_keys if _is_tied(model, n)}
    missing = [n for n in result.missing_keys if n not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint and model disagree: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval()


def _config_object(config: dict[str, Any]) -> Any:
    """The family's transformers config object for a config dict (never remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"this transformers has no config class for model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(config)


def _dtype_for_stock(dtype: Any) -> Any:
    return dtype if dtype is not None else "auto"


def _is_tied(model: Any, name: str) -> bool:
    """A parameter missing from the checkpoint because it shares storage with another."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    if p is None:
        return False
    return any(q is p for n, q in params.items() if n != name)


def _add_missing_biases(model: Any, index: dict[str, Any]) -> None:
    """Give a bias to every nn.Linear whose checkpoint has one (`compensate`)."""
    import torch
    from torch import nn

    own = set(model.state_dict())
    for name in index:
        if name in own or not name.endswith(".bias"):
            continue
        module_path = name.removesuffix(".bias")
        try:
            linear = model.get_submodule(module_path)
        except AttributeError:
            continue
        if isinstance(linear, nn.Linear) and linear.bias is None:
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


def fuse_experts(
    arch: Any, state: dict[str, Any], own: dict[str, Any], layers: Iterable[int]
) -> None:
    """Checkpoint tensors one per expert, model parameters fused (transformers 5 keeps a
    layer's experts as `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`
    [E, H, I]): stack them as `from_pretrained`'s conversion does, in place, for the
    given layer indices (`executor.layerwise` passes one layer at a time).

    The roles come from the architecture table: the two (expert_ffn, hidden) tensors
    are gate then up (gate_proj/up_proj, Mixtral's w1/w3), the (hidden, expert_ffn)
    one is down; the router (experts, hidden) moves to the model's own name for it
    (Mixtral's `block_sparse_moe.gate` is `mlp.gate` in memory).
    """
    import torch

    per_expert = [s for s in arch.moe_mlp if s.per_expert]
    gate_up = [s for s in per_expert if s.dims == ("expert_ffn", "hidden")]
    down = [s for s in per_expert if s.dims == ("hidden", "expert_ffn")]
    router = [s for s in arch.moe_mlp if s.dims == ("experts", "hidden")]
    if len(gate_up) != 2 or len(down) != 1:
        return
    for j in layers:
        prefix = arch.layer_prefix.replace("{i}", str(j))

        def disk(spec: Any, e: int, prefix: str = prefix) -> str:
            return prefix + spec.name.replace("{e}", str(e))

        count = 0
        while disk(gate_up[0], count) in state:
            count += 1
        fused = [k for k in own if k.startswith(prefix) and k.endswith("experts.gate_up_proj")]
        if not count or len(fused) != 1 or fused[0] in state:
            continue
        base = fused[0].removesuffix("gate_up_proj")
        state[base + "gate_up_proj"] = torch.stack(
            [torch.cat([state.pop(disk(s, e)) for s in gate_up], dim=0) for e in range(count)]
        )
        state[base + "down_proj"] = torch.stack([state.pop(disk(down[0], e)) for e in range(count)])
        for spec in router:
            name = prefix + spec.name
            target = base.removesuffix("experts.") + "gate.weight"
            if name in state and name not in own and target in own:
                state[target] = state.pop(name)
