"""config.json of a pruned (or partly restored) model.

The new config is the original one with every key a plan changes rewritten:
layer count and per-layer lists (`compiler.architectures.renumber_layer_config`),
then the widths: attention heads, KV heads, MLP width. Which config key holds
each width comes from the architecture table (`Architecture.facts`), and the
new value is scaled from the original raw value (Qwen-1 stores twice the MLP
width; scaling keeps its convention without a special case).

When one config cannot describe the model (layers of different widths,
`compensate` biases, or widths the family's config class refuses), the
top-level widths are the largest any layer has (the original ones if the
config class refuses even those), and the exact widths of every layer are
stored under the `plancc` key, which `executor.load` reads:

    "model_type": "plancc-llama",          # see below
    "architectures": ["PlanccLlamaForCausalLM"],
    "plancc": {
      "format": 2,
      "loader": "executor.load",
      "note": "...",                      # what to do with it, for people
      "hf": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
      "layers": [                         # one entry per layer, in new order
        {"original": 0,                   # original layer index
         "config": {"num_attention_heads": 6, "num_key_value_heads": 2,
                    "intermediate_size": 1024, "head_dim": 64}},
        ...
      ]
    }

Such a config must never load in a stock loader, which would build every
layer at the top-level widths: transformers 5.23 then raises a size mismatch,
but 5.25 only warns ("Reinit due to size mismatch") and returns random MLPs.
So the keys by which stock loaders choose a model class (`model_type` for
transformers' AutoConfig and vLLM, `architectures` for llama.cpp's converter,
`auto_map` for trust_remote_code; `IDENTITY_KEYS`) are replaced by plancc's
own (`plancc-llama`, `PlanccLlamaForCausalLM`), which every stock loader
refuses by name, and the real ones are kept under `plancc.hf`. Everything
else is the family's config unchanged, so tokenizers (which fall back to a
plain config) still load. `model_config` (`executor.family_config`, the
reader below this writer) gives plancc's readers (`executor.load`, heal,
export) the family's config back, for this layout and for the Nemotron-NAS one.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from compiler.architectures import Architecture, renumber_layer_config
from compiler.cache import read_json, write_json
from compiler.checkpoint import canonical_json
from executor.family_config import IDENTITY_KEYS, PLANCC_KEY, config_key

# Width facts a plan can change in a dense layer, in config order.
WIDTH_FACTS = ("heads", "kv_heads", "ffn")
# And in a MoE layer (`executor.experts`).
MOE_WIDTH_FACTS = ("experts", "expert_ffn", "shared_ffn")
PLANCC_FORMAT = 2  # 2: identity keys sealed under `plancc.hf` (format 1 left them in place)
OWN_MODEL_TYPE_PREFIX = "plancc-"


@dataclass(frozen=True)
class LayerShape:
    """The widths of one layer of the written model."""

    original: int
    heads: int
    kv_heads: int
    ffn: int | None
    added_biases: tuple[str, ...] = ()  # layer-relative names of tensors `compensate` added
    # A MoE layer's routed experts, their width and the shared expert's (None: dense layer,
    # or no shared expert).
    experts: int | None = None
    expert_ffn: int | None = None
    shared_ffn: int | None = None

    def widths(self) -> dict[str, int]:
        out = {"heads": self.heads, "kv_heads": self.kv_heads}
        for fact in ("ffn", *MOE_WIDTH_FACTS):
            value = getattr(self, fact)
            if value is not None:
                out[fact] = value
        return out

    def to_json(self) -> dict[str, Any]:
        out = {
            "original": self.original,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "ffn": self.ffn,
            "added_biases": list(self.added_biases),
        }
        if self.experts is not None:
            out |= {f: getattr(self, f) for f in MOE_WIDTH_FACTS}
        return out

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> LayerShape:
        return LayerShape(
            int(d["original"]),
            int(d["heads"]),
            int(d["kv_heads"]),
            None if d.get("ffn") is None else int(d["ffn"]),
            tuple(d.get("added_biases") or ()),
            *(None if d.get(f) is None else int(d[f]) for f in MOE_WIDTH_FACTS),
        )


def _raw(arch: Architecture, fact: str, config: Mapping[str, Any], orig: Mapping[str, Any], v: int):
    """Config value for fact value `v`, in the config's own units (scaled from the original)."""
    key = config_key(arch, fact, config)
    base = orig.get(fact)
    raw = config.get(key) if key else None
    if isinstance(raw, int) and isinstance(base, int) and base:
        return raw * v // base
    return v


def width_overrides(
    arch: Architecture,
    config: Mapping[str, Any],
    facts: Mapping[str, Any],
    widths: Mapping[str, int],
) -> dict[str, Any]:
    """Config keys and raw values that give a layer these widths."""
    out: dict[str, Any] = {}
    for fact, value in widths.items():
        key = config_key(arch, fact, config)
        if key is not None:
            out[key] = _raw(arch, fact, config, facts, value)
    # head_dim defaults to hidden/heads in most families: pin it once heads change.
    hd_key = config_key(arch, "head_dim", config)
    if hd_key is not None and widths.get("heads") != facts.get("heads"):
        out[hd_key] = config.get(hd_key, facts.get("head_dim"))
    return out


VERDICT_CACHE = "config_verdicts.json"
VERDICT_CACHE_MAX = 512


def config_accepts(config: Mapping[str, Any]) -> tuple[bool, str]:
    """Does the family's transformers config class accept this config? (and why not)

    Building the class imports transformers and torch (seconds); the verdict
    depends only on the config and the transformers version, so it is
    memoized on disk (`compiler.cache`), like the cost report's verdicts.
    """
    try:
        installed = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return False, "transformers is not installed"
    digest = hashlib.sha256(canonical_json(dict(config)).encode("utf-8")).hexdigest()
    key = f"transformers {installed}|{digest}"
    cached = read_json(VERDICT_CACHE)
    hit = cached.get(key)
    if isinstance(hit, list) and len(hit) == 2:
        return bool(hit[0]), str(hit[1])
    verdict = _build_config_class(config)
    if len(cached) >= VERDICT_CACHE_MAX:
        cached = {}
    cached[key] = list(verdict)
    write_json(VERDICT_CACHE, cached)
    return verdict


def _build_config_class(config: Mapping[str, Any]) -> tuple[bool, str]:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False, "transformers is not installed"
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return False, f"this transformers has no config class for `{model_type}`"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
            if hasattr(cfg, "validate"):
                cfg.validate()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return False, f"{CONFIG_MAPPING[model_type].__name__} refuses it: " + (
            " ".join(t.strip() for t in text) if text else type(exc).__name__
        )
    return True, "accepted"


@dataclass(frozen=True)
class NewConfig:
    config: dict[str, Any]
    uniform: bool
    needs_loader: bool
    reason: str


def build_config(
    original: Mapping[str, Any],
    arch: Architecture,
    facts: Mapping[str, Any],
    layers: list[LayerShape],
    keep_remote_code: bool = False,
) -> NewConfig:
    """config.json for a model whose layers are `layers` (new order).

    `auto_map` (which makes transformers import the model's own `*.py` code)
    is dropped unless `keep_remote_code`: the table's families load without it.
    """
    cfg = copy.deepcopy(dict(original))
    cfg.pop(PLANCC_KEY, None)
    if not keep_remote_code:
        cfg.pop("auto_map", None)
    cfg.update(renumber_layer_config(arch, original, [s.original for s in layers]))
    widths = [s.widths() for s in layers]
    # MoE layers (no dense `ffn`) and dense layers are compared separately, as
    # their config does; `top` is the largest width of every fact.
    kinds: dict[bool, list[dict[str, int]]] = {}
    for w in widths:
        kinds.setdefault("ffn" in w, []).append(w)
    uniform = all(all(w == ws[0] for w in ws) for ws in kinds.values())
    added = any(s.added_biases for s in layers)
    top = {
        f: max(w[f] for w in widths if f in w) for f in dict.fromkeys(k for w in widths for k in w)
    }
    cfg.update(width_overrides(arch, original, facts, top))
    ok, why = config_accepts(cfg)
    if uniform and not added and ok:
        return NewConfig(cfg, True, False, "uniform: stock from_pretrained loads it")
    if not ok:
        # Describe the model with widths the class accepts; `plancc` holds the truth.
        original_widths = {f: facts[f] for f in top if f in facts}
        cfg.update(width_overrides(arch, original, facts, original_widths))
    if not uniform:
        reason = "heterogeneous: layers differ in width; load with executor.load"
    elif added:
        reason = (
            "`compensate` added biases the stock config cannot describe; load with executor.load"
        )
    else:
        reason = f"not stock-loadable: {why}; load with executor.load"
    cfg[PLANCC_KEY] = {
        "format": PLANCC_FORMAT,
        "loader": "executor.load",
        "note": "layers differ from the top-level config: load with plancc's executor.load, "
        "or `plancc export` it (--format nemotron-nas or gguf) for vLLM, transformers and "
        "llama.cpp",
        "layers": [
            {
                "original": s.original,
                "config": width_overrides(arch, original, facts, s.widths()),
                "added_biases": list(s.added_biases),
            }
            for s in layers
        ],
    }
    return NewConfig(seal(cfg), uniform, True, reason)


def seal(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config with a `plancc` layers record, made unloadable by stock loaders: its
    identity keys move under `plancc.hf`, plancc's own names take their place."""
    out = dict(config)
    spec = dict(out.pop(PLANCC_KEY))
    identity = {k: out.pop(k) for k in IDENTITY_KEYS if k in out}
    model_type = str(identity.get("model_type", "model"))
    out["model_type"] = OWN_MODEL_TYPE_PREFIX + model_type
    names = identity.get("architectures") or [model_type]
    out["architectures"] = [f"Plancc{n}" for n in names]
    out[PLANCC_KEY] = {**spec, "hf": identity}
    return out
