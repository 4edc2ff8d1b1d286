"""The Nemotron-NAS (DeciLM) layout: a heterogeneous Llama that vLLM and transformers load.

NVIDIA's Llama-Nemotron models (51B, Super-49B, Ultra-253B) ship in it, so the
serving stacks load it: vLLM natively (`DeciLMForCausalLM`,
`vllm/model_executor/models/nemotron_nas.py`), transformers with
`trust_remote_code`, llama.cpp's converter as the `deci` architecture. The
tensors are plain HF Llama tensors under their usual names; only config.json
differs:

- `model_type: "nemotron-nas"`, `architectures: ["DeciLMForCausalLM"]`,
  `auto_map` to plancc's own configuration and modeling module
  (`executor/formats/decilm/`, copied next to config.json);
- `block_configs`: per layer `attention {no_op, replace_with_linear,
  n_heads_in_group}` and `ffn {no_op, replace_with_linear, ffn_mult |
  intermediate_size}`; `hidden_size`, `num_attention_heads` and `head_dim`
  stay global, `num_key_value_heads` and `intermediate_size` are null;
- `plancc`: what `executor.load` needs to rebuild the family's own config
  (the keys this layout replaces, under `hf`; the keys it added, under
  `added`), so plancc loads the result as the family's model, never through
  the shipped code.

`ffn_mult` is written when the width is a multiple of 256 and the DeciLM
formula gives it back exactly (every vLLM, llama.cpp's converter and NVIDIA's
code read it); any other width is written as `intermediate_size`, which only
vLLM since PR 30795 (December 2025) and plancc's module read.

What the layout cannot express is refused by `nemotron_nas_problem`, one
function, so that the compiler's target table can later take its place.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compiler.architectures import Architecture, read_facts
from compiler.checkpoint import CONFIG_NAME, TensorInfo, architecture_of, read_config, tensor_index
from compiler.targets import TARGETS
from executor.configs import LayerShape
from executor.family_config import (
    FFN_MULT_GRANULE,
    PLANCC_KEY,
    LayoutError,
    config_key,
    ffn_mult_to_intermediate_size,
    is_decilm,
    model_config,
)
from executor.family_config import NAS_LAYOUT as LAYOUT
from executor.family_config import NAS_MODEL_TYPE as MODEL_TYPE
from executor.layout import LAYERS_MAP, MANIFEST, ORIGINAL_CONFIG_DIR, PRUNE_LOG, write_json
from executor.safetensors_io import OutEntry, SourceFiles, order_for_alignment, write_file

ARCHITECTURES = ["DeciLMForCausalLM"]
MODULE_DIR = Path(__file__).resolve().parent / "decilm"
MODULE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}
# Families whose layers are Llama layers (RMSNorm, rotary attention, SwiGLU MLP):
# the vLLM target's row of the serving-target table (one source of truth).
FAMILIES = tuple(TARGETS["vllm"].families)
# Keys of the family's config that describe what the shipped module does not
# implement (sliding windows) or that are per layer here: dropped from the
# Nemotron-NAS config, kept under `plancc.hf` for executor.load.
DROPPED_KEYS = (
    "auto_map",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "pretraining_tp",
)

# ---- the DeciLM width formula (read back by `family_config.block_width`) ---------------


def ffn_block(width: int, hidden_size: int) -> dict[str, Any]:
    """The `ffn` entry of one layer: `ffn_mult` when it gives `width` back exactly
    (NVIDIA rounds it to 6 decimals, so that rounded value must too), else
    `intermediate_size`."""
    entry: dict[str, Any] = {"no_op": False, "replace_with_linear": False}
    if width % FFN_MULT_GRANULE == 0:
        mult = round(1.5 * width / hidden_size, 6)
        if ffn_mult_to_intermediate_size(mult, hidden_size) == width:
            return entry | {"ffn_mult": float(mult)}
    return entry | {"intermediate_size": int(width)}


# ---- what the layout can express -------------------------------------------------------


def nemotron_nas_problem(
    arch: Architecture, config: Mapping[str, Any], shapes: Sequence[LayerShape]
) -> str | None:
    """The first rule of the Nemotron-NAS layout the model breaks (with the fix), or None.

    `config` is the family's config (its global keys), `shapes` every layer's
    widths. The rules, from vLLM's `nemotron_nas.py` and its config handling:
    a Llama-layout family computed by the stock Llama code (a config that names
    its own code, `auto_map`, is refused); no sliding-window attention (the layout has none);
    dense layers (no MoE); `num_attention_heads` and `head_dim` global, so only
    the KV-head count varies per layer and must divide the query heads
    (`n_heads_in_group`); biases global (`attention_bias`, `qkv_bias`,
    `mlp_bias`), so no per-layer `compensate` bias; every layer keeps both
    sub-blocks (plans never make no-op ones).
    """
    other = "; write it with --format hf (loads with executor.load) or --format gguf"
    if arch.name not in FAMILIES:
        return (
            f"Nemotron-NAS is a Llama layout; `{arch.name}` is not one "
            f"(supported: {', '.join(FAMILIES)}){other}"
        )
    if config.get("auto_map"):
        return (
            "the model names its own code (`auto_map`), which the Nemotron-NAS layout would "
            f"replace by plancc's Llama code{other}"
        )
    window = config.get("sliding_window")
    max_pos = config.get("max_position_embeddings")
    windowed = (
        config.get("use_sliding_window") is True
        or any(t != "full_attention" for t in config.get("layer_types") or ())
        or (
            arch.name == "mistral"
            and window is not None
            and (not isinstance(max_pos, int) or window < max_pos)
        )
    )
    if windowed:
        return f"the model uses sliding-window attention, which Nemotron-NAS cannot express{other}"
    moe = [s.original for s in shapes if s.experts is not None or s.ffn is None]
    if moe:
        return f"layers {_layers(moe)} are MoE layers; Nemotron-NAS layers are dense{other}"
    heads = sorted({s.heads for s in shapes})
    if len(heads) > 1:
        by = {h: [s.original for s in shapes if s.heads == h] for h in heads}
        detail = "; ".join(f"{h} in original layers {_layers(ls)}" for h, ls in by.items())
        return (
            "Nemotron-NAS keeps num_attention_heads global, but the layers have "
            f"different query-head counts ({detail}): `attn ... drop groups` removes query "
            "heads with their KV head. Drop the same number of groups in every layer, "
            f"or keep the attention uniform{other}"
        )
    bad = [s.original for s in shapes if s.kv_heads <= 0 or s.heads % s.kv_heads]
    if bad:
        return (
            f"layers {_layers(bad)}: the KV-head count does not divide the query heads "
            f"(n_heads_in_group must be a whole number){other}"
        )
    biased = [s.original for s in shapes if s.added_biases]
    if biased:
        return (
            f"layers {_layers(biased)} carry `compensate` biases (o_proj/down_proj), which "
            "Nemotron-NAS cannot express (its biases are global); remove `compensate` from "
            f"the plan{other}"
        )
    return None


def _layers(items: Sequence[int]) -> str:
    return ", ".join(str(i) for i in items)


def check_layout(
    arch: Architecture, config: Mapping[str, Any], shapes: Sequence[LayerShape]
) -> None:
    """Raise LayoutError with `nemotron_nas_problem`'s message when the model does not fit."""
    problem = nemotron_nas_problem(arch, config, shapes)
    if problem is not None:
        raise LayoutError(f"--format {LAYOUT}: {problem}")


# ---- config.json ------------------------------------------------------------------


def layer_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every layer's config keys that differ from the top level (`plancc` layers), or
    nothing per layer for a uniform config."""
    spec = config.get(PLANCC_KEY) or {}
    layers = spec.get("layers")
    if layers:
        return [dict(rec.get("config") or {}) for rec in layers]
    count = config.get("num_hidden_layers")
    return [{} for _ in range(int(count or 0))]


def shapes_of(
    arch: Architecture, config: Mapping[str, Any], index: Mapping[str, TensorInfo]
) -> list[LayerShape]:
    """Every layer's widths from a written model (its config and tensor names); a bias
    tensor the global flags do not explain counts as an added (`compensate`) bias.
    `original` is the layer's index in this model."""
    facts = read_facts(arch, config)
    keys = {f: config_key(arch, f, config) for f in ("heads", "kv_heads", "ffn")}
    expected = _bias_names(facts)
    pattern = arch.layer_pattern()
    biases: dict[int, set[str]] = {}
    for name in index:
        m = pattern.match(name)
        if m and name.endswith(".bias"):
            biases.setdefault(int(m.group(1)), set()).add(m.group(2))
    out = []
    for j, over in enumerate(layer_configs(config)):
        merged = {**config, **over}

        def get(fact: str, merged: Mapping[str, Any] = merged) -> Any:
            key = keys[fact]
            return merged.get(key) if key else None

        heads = int(get("heads") or facts["heads"])
        kv = int(get("kv_heads") or heads)
        ffn = get("ffn")
        added = tuple(sorted(biases.get(j, set()) - expected))
        out.append(LayerShape(j, heads, kv, None if ffn is None else int(ffn), added))
    return out


def _bias_names(facts: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    if facts.get("qkv_bias"):
        names |= {f"self_attn.{p}_proj.bias" for p in "qkv"}
    if facts.get("o_bias"):
        names.add("self_attn.o_proj.bias")
    if facts.get("mlp_bias"):
        names |= {f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
    return names


def decilm_config(
    arch: Architecture, config: Mapping[str, Any], shapes: Sequence[LayerShape]
) -> dict[str, Any]:
    """The Nemotron-NAS config.json of a model whose family config is `config` and whose
    layers have `shapes` (checked first: LayoutError when it does not fit)."""
    check_layout(arch, config, shapes)
    facts = read_facts(arch, config)
    hidden = int(facts["hidden"])
    heads = shapes[0].heads
    base = {k: v for k, v in config.items() if k != PLANCC_KEY}
    out = {k: v for k, v in base.items() if k not in DROPPED_KEYS}
    out |= {
        "architectures": list(ARCHITECTURES),
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "num_attention_heads": heads,
        "head_dim": int(facts["head_dim"]),
        "num_key_value_heads": None,
        "intermediate_size": None,
        "attention_bias": bool(facts.get("o_bias")),
        "mlp_bias": bool(facts.get("mlp_bias")),
    }
    if bool(facts.get("qkv_bias")) != bool(facts.get("o_bias")):
        out["qkv_bias"] = bool(facts.get("qkv_bias"))
    rope = base.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" in rope and "rope_theta" not in base:
        out["rope_theta"] = rope["rope_theta"]  # for readers from before rope_parameters
    out["block_configs"] = [
        {
            "attention": {
                "no_op": False,
                "replace_with_linear": False,
                "n_heads_in_group": s.heads // s.kv_heads,
            },
            "ffn": ffn_block(int(s.ffn or 0), hidden),
        }
        for s in shapes
    ]
    out[PLANCC_KEY] = {
        "format": 1,
        "layout": LAYOUT,
        "loader": "executor.load",
        "hf": {k: v for k, v in base.items() if out.get(k, _ABSENT) != v},
        "added": sorted(k for k in out if k not in base and k != PLANCC_KEY),
    }
    return out


_ABSENT = object()


# ---- files ------------------------------------------------------------------------


def install_module(dest: Path) -> list[str]:
    """Copy plancc's configuration and modeling module next to `dest`/config.json."""
    for name in MODULE_FILES:
        shutil.copyfile(MODULE_DIR / name, dest / name)
    return list(MODULE_FILES)


# Files of an apply output's A that are plancc's metadata, not part of a model.
def _apply_metadata() -> set[str]:
    return {MANIFEST, PRUNE_LOG, LAYERS_MAP, ORIGINAL_CONFIG_DIR}


def write_nemotron_nas(a_dir: Path, dest: Path) -> dict[str, Any]:
    """Write the model in `a_dir` (an apply or restore result, any plancc layout) to the
    empty directory `dest` in the Nemotron-NAS layout; return the new config.

    Tensors keep their names, files and bytes (byte-range copies, peak memory
    about one tensor); tokenizer, generation config and other side files are
    copied; plancc's apply metadata is not (the export is a model, not an
    apply output). Raises LayoutError, before writing anything, when the model
    does not fit the layout.
    """
    raw = read_config(a_dir)
    config = model_config(raw)
    index = tensor_index(a_dir)
    arch = architecture_of(config, str(a_dir / CONFIG_NAME))
    new = decilm_config(arch, config, shapes_of(arch, config, index)) if not is_decilm(raw) else raw
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted({info.file for info in index.values()})
    with SourceFiles() as sources:
        for file in files:
            entries = [
                OutEntry(i.name, i.dtype, i.shape, copy=(a_dir / file, *i.byte_range))
                for i in index.values()
                if i.file == file
            ]
            meta = _file_metadata(a_dir / file)
            write_file(dest / file, order_for_alignment(entries), sources, metadata=meta)
    skip = {CONFIG_NAME, *_apply_metadata(), *MODULE_FILES}
    for p in sorted(a_dir.iterdir()):
        if (
            p.is_file()
            and p.name not in skip
            and p.name not in files
            and not p.name.startswith(".")
        ):
            shutil.copyfile(p, dest / p.name)  # the shard index too: same files, same names
    write_json(dest / CONFIG_NAME, new)
    install_module(dest)
    return new


def _file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (transformers wants `format: pt`)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} or {"format": "pt"}
