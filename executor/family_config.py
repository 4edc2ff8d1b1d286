"""A written model's config.json read back as its family's own config.

plancc writes two layouts that stock loaders do not take for the family's
config: its sealed one (`executor.configs`: identity keys under `plancc.hf`,
exact per-layer widths under `plancc.layers`) and the Nemotron-NAS one
(`executor.formats.nemotron_nas`: `block_configs`, with what it replaced under
`plancc`). `model_config` gives plancc's readers (`executor.load`, heal,
export) the family's config of either, with a `plancc` layers record.

This module reads; the writers are above it and take from it the keys they
share with the reader (`PLANCC_KEY`, `IDENTITY_KEYS`, `config_key`) and the
DeciLM width formula, so that the writers and the reader cannot disagree and
neither writer is imported to read a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compiler.architectures import Architecture, read_facts
from compiler.checkpoint import architecture_of
from compiler.targets import TARGETS

PLANCC_KEY = "plancc"
IDENTITY_KEYS = ("model_type", "architectures", "auto_map")

# The Nemotron-NAS layout (`executor.formats.nemotron_nas` writes it).
NAS_LAYOUT = "nemotron-nas"
NAS_MODEL_TYPE = "nemotron-nas"
# vLLM's `_ffn_mult_to_intermediate_size` rounds up to this; the target's granularity.
FFN_MULT_GRANULE = TARGETS["vllm"].ffn_multiple


class LayoutError(ValueError):
    """The model cannot be written in the Nemotron-NAS layout (the message says why and the fix)."""


def config_key(arch: Architecture, fact: str, config: Mapping[str, Any]) -> str | None:
    """The config key that holds `fact` in this config (the first spelling present)."""
    keys = arch.facts[fact].keys if fact in arch.facts else ()
    present = [k for k in keys if k in config]
    return present[0] if present else (keys[0] if keys else None)


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The family's own config of a written model, as transformers' config class and the
    architecture table read it: a sealed plancc config gets its identity keys back, a
    Nemotron-NAS config plancc wrote becomes the family's config with a `plancc` layers
    record; any other config is returned as it is."""
    if is_decilm(config):
        return hf_config(config)
    spec = config.get(PLANCC_KEY)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("hf"), Mapping):
        return dict(config)
    out = {k: v for k, v in config.items() if k not in IDENTITY_KEYS}
    out.update(spec["hf"])
    out[PLANCC_KEY] = {k: v for k, v in spec.items() if k != "hf"}
    return out


# ---- the Nemotron-NAS layout, read back --------------------------------------------


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """`int(2 * ffn_mult * hidden / 3)` rounded up to a multiple of 256, as vLLM,
    llama.cpp's converter and NVIDIA's code compute it."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_MULT_GRANULE == 0 else n + FFN_MULT_GRANULE - n % FFN_MULT_GRANULE


def block_width(ffn: Mapping[str, Any], hidden_size: int) -> int:
    """A layer's MLP width from its `ffn` entry, read as vLLM reads it (`ffn_mult` wins)."""
    if "ffn_mult" in ffn:
        return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden_size)
    return int(ffn["intermediate_size"])


def is_decilm(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") == NAS_MODEL_TYPE


def hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The family's own config (with per-layer `plancc` layers) of a Nemotron-NAS config
    plancc wrote: what executor.load builds the model from. Raises LayoutError for a
    Nemotron-NAS config plancc did not write (NVIDIA's models need their own code)."""
    spec = config.get(PLANCC_KEY) or {}
    if spec.get("layout") != NAS_LAYOUT or not isinstance(spec.get("hf"), Mapping):
        raise LayoutError(
            "a Nemotron-NAS config.json plancc did not write (no `plancc.hf` record): load it "
            "with transformers' AutoModelForCausalLM and trust_remote_code=True"
        )
    added = set(spec.get("added") or ())
    out = {k: v for k, v in config.items() if k not in added and k != PLANCC_KEY}
    out.update(spec["hf"])
    arch = architecture_of(out)
    facts = read_facts(arch, out)
    hidden = int(config["hidden_size"])
    heads_key = config_key(arch, "heads", out)
    kv_key = config_key(arch, "kv_heads", out)
    ffn_key = config_key(arch, "ffn", out)
    layers = []
    for block in config["block_configs"]:
        heads = int(config["num_attention_heads"])
        layer = {
            heads_key: heads,
            kv_key: heads // int(block["attention"]["n_heads_in_group"]),
            ffn_key: block_width(block["ffn"], hidden),
        }
        hd_key = config_key(arch, "head_dim", out)
        if hd_key is not None:
            layer[hd_key] = int(facts["head_dim"])
        layers.append({"config": {k: v for k, v in layer.items() if k is not None}})
    out[PLANCC_KEY] = {"format": 1, "loader": "executor.load", "layers": layers}
    return out
