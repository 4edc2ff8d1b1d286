"""The model block, validated and typed: `ModelFacts`.

The plan repeats the shape facts it depends on so it can be checked without
weights. This module knows which facts exist, their types, and turns the
`model { }` block into a `ModelFacts` the passes and the cost model use.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler import ir
from compiler.architectures import ARCH_NAMES, ARCHITECTURES, Architecture
from compiler.diagnostics import Diagnostic, error, warning

INT_FACTS = (
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "ffn",
    "vocab",
    "experts",
    "top_k",
    "expert_ffn",
    "shared_ffn",
    "expert_groups",
    # multi-head latent attention (DeepSeek-V3): q and kv low ranks, rope / nope / v
    # widths per head
    "q_lora",
    "kv_lora",
    "rope_dim",
    "nope_dim",
    "v_dim",
)
BOOL_FACTS = ("tied", "qkv_bias", "o_bias", "mlp_bias")
# `weights`: the sha256 of the weights the plan was measured on (optional; see
# `compiler.checkpoint.weights_digest`); apply refuses a source with other weights.
STR_FACTS = ("arch", "fingerprint", "weights")
SELECTION_FACTS = ("dense_layers",)
KNOWN_FACTS = STR_FACTS + INT_FACTS + BOOL_FACTS + SELECTION_FACTS
# Upper bounds that keep a mistyped number from making the checker expand a
# billion-entry range; real models are far below them.
LIMITS = {"layers": 4096, "heads": 65536, "kv_heads": 65536, "experts": 65536}
# Facts that may be zero (a MoE without a shared expert states `shared_ffn 0`).
ZERO_OK = ("shared_ffn",)


@dataclass(frozen=True)
class ModelFacts:
    """Typed model facts. Missing facts are None; statements needing them fail P101."""

    name: str
    arch: Architecture | None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    vocab: int | None = None
    tied: bool = False
    experts: int | None = None
    top_k: int | None = None
    expert_ffn: int | None = None
    shared_ffn: int | None = None
    expert_groups: int | None = None
    q_lora: int | None = None
    kv_lora: int | None = None
    rope_dim: int | None = None
    nope_dim: int | None = None
    v_dim: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    dense_layers: frozenset[int] = frozenset()
    fingerprint: str | None = None
    weights: str | None = None  # the weights digest the plan's scores were measured on

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @property
    def group_size(self) -> int | None:
        """Query heads per KV head (the GQA ratio)."""
        if self.heads and self.kv_heads and self.heads % self.kv_heads == 0:
            return self.heads // self.kv_heads
        return None

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    def as_dict(self) -> dict[str, object]:
        """Plan-vocabulary facts (what `read_facts` gives for a checkpoint)."""
        out: dict[str, object] = {}
        for key in INT_FACTS + BOOL_FACTS + ("fingerprint",):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.dense_layers:
            out["dense_layers"] = tuple(sorted(self.dense_layers))
        return out


def _typed_value(fact: ir.Fact) -> tuple[object, str | None]:
    """Coerce one known fact's value and say what it should have been; kept apart so
    the per-type rules read as one table instead of nesting inside the fact loop."""
    value = fact.value
    problem = None
    if fact.key in INT_FACTS:
        if not isinstance(value, int) or isinstance(value, bool):
            problem = "an integer"
        elif value <= 0 and not (value == 0 and fact.key in ZERO_OK):
            problem = "a positive integer"
        elif value > LIMITS.get(fact.key, 2**40):
            problem = f"at most {LIMITS.get(fact.key, 2**40)}"
    elif fact.key in BOOL_FACTS:
        if not isinstance(value, bool):
            problem = "`true` or `false`"
    elif fact.key in SELECTION_FACTS:
        if isinstance(value, int) and not isinstance(value, bool):
            value = ir.Selection.from_ints([value])
        if not isinstance(value, ir.Selection):
            problem = "a list of layers"
    elif fact.key in ("fingerprint", "weights"):
        if not isinstance(value, str):
            problem = 'a quoted string "sha256:..."'
    elif fact.key == "arch" and not isinstance(value, str):
        problem = "an architecture name"
    return value, problem


def _fact_values(block: ir.ModelBlock, diags: list[Diagnostic]) -> dict[str, object]:
    """Collect the well-typed facts by key, reporting unknown, repeated and ill-typed
    ones; every later check works on this dict, never on the raw facts."""
    values: dict[str, object] = {}
    for fact in block.facts:
        if fact.key not in KNOWN_FACTS:
            diags.append(
                error(
                    "P003",
                    f"unknown model fact `{fact.key}`",
                    fact.span,
                    "model facts are: " + ", ".join(KNOWN_FACTS),
                )
            )
            continue
        if fact.key in values:
            diags.append(
                error("P009", f"model fact `{fact.key}` is stated twice", fact.span, "keep one")
            )
            continue
        value, problem = _typed_value(fact)
        if problem:
            diags.append(
                error("P011", f"model fact `{fact.key}` must be {problem}", fact.value_span)
            )
            continue
        values[fact.key] = value
    return values


def _required_facts(
    block: ir.ModelBlock, values: dict[str, object], diags: list[Diagnostic]
) -> Architecture | None:
    """Resolve `arch` and report a missing `arch` or `layers`: the two facts no plan
    can be compiled without."""
    arch = None
    arch_fact = block.fact("arch")
    if "arch" in values:
        arch = ARCHITECTURES.get(str(values["arch"]))
        if arch is None:
            diags.append(
                error(
                    "P010",
                    f"unknown architecture `{values['arch']}`",
                    arch_fact.value_span if arch_fact else block.span,
                    "supported: " + ", ".join(ARCH_NAMES),
                )
            )
    elif arch_fact is None:
        diags.append(error("P101", "the model block does not state `arch`", block.span))
    if "layers" not in values and block.fact("layers") is None:
        diags.append(
            error(
                "P101",
                "the model block does not state `layers`",
                block.span,
                "`plangen header MODEL_DIR` prints every fact",
            )
        )
    return arch


def _cross_checks(
    block: ir.ModelBlock, values: dict[str, object], diags: list[Diagnostic]
) -> object:
    """Check the facts against each other (heads/kv_heads, dense_layers within
    layers) and warn on a missing fingerprint; returns the dense layers kept, or None.
    Drops what fails so ModelFacts never holds an inconsistent pair."""
    heads, kv = values.get("heads"), values.get("kv_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv != 0:
        fact = block.fact("kv_heads")
        diags.append(
            error(
                "P011",
                f"heads {heads} is not a multiple of kv_heads {kv}",
                fact.value_span if fact else block.span,
            )
        )
        values.pop("kv_heads")
    if "fingerprint" not in values:
        diags.append(
            warning(
                "W005",
                "the model block has no fingerprint: apply cannot prove the checkpoint matches",
                block.span,
                "add the `fingerprint` line that `plangen header MODEL_DIR` prints",
            )
        )
    dense = values.pop("dense_layers", None)
    layers = values.get("layers")
    if isinstance(dense, ir.Selection) and isinstance(layers, int):
        fact = block.fact("dense_layers")
        for r in dense.ranges:
            if r.lo > r.hi or r.hi >= layers:
                # A lone integer (`dense_layers 15`) reaches here as a value without a
                # range of its own: the fact's value is then the place to point at.
                where = r.span if r.span.line else (fact.value_span if fact else block.span)
                diags.append(
                    error("P104", f"dense_layers {r.lo}..{r.hi} is outside 0..{layers - 1}", where)
                )
                dense = None
                break
    elif isinstance(dense, ir.Selection):
        dense = None
    return dense


def validate_facts(block: ir.ModelBlock) -> tuple[ModelFacts, list[Diagnostic]]:
    """Type-check every fact; unknown, duplicate and ill-typed facts are errors."""
    diags: list[Diagnostic] = []
    values = _fact_values(block, diags)
    arch = _required_facts(block, values, diags)
    dense = _cross_checks(block, values, diags)
    facts = ModelFacts(
        name=block.name,
        arch=arch,
        dense_layers=frozenset(dense) if isinstance(dense, ir.Selection) else frozenset(),
        **{k: v for k, v in values.items() if k != "arch"},  # type: ignore[arg-type]
    )
    return facts, diags


# Canonical layout of the model block: one tuple per printed line, in order.
# `plancc fmt` and `plangen header` both print through this table.
FACT_LINES: tuple[tuple[str, ...], ...] = (
    ("arch",),
    ("layers", "hidden", "ffn", "vocab", "tied"),
    ("heads", "kv_heads", "head_dim"),
    ("q_lora", "kv_lora", "rope_dim", "nope_dim", "v_dim"),
    ("experts", "top_k", "expert_ffn", "shared_ffn", "expert_groups"),
    ("qkv_bias", "o_bias", "mlp_bias"),
    ("dense_layers",),
    ("fingerprint",),
    ("weights",),
)
