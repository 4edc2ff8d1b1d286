"""The serving-target table: where a plan's result runs, as data.

Beside the architecture table (`compiler.architectures`, how a family is laid
out) this table says where a pruned result can be served and what that needs:
each `Target` names its output format (what `plancc apply --format` writes for
it), the families it runs with the architecture each is written as, the facts
a writer and the planner read (`ffn_multiple`, `per_layer_heads`,
`output_biases`), and its `rules`. A `Rule` is a diagnostic code, a predicate
over the resolved plan and a message with the fix. `plancc check --target`
turns every broken rule into a located error; the cost report lists, per
target, `runs` or the first reason it does not. Adding a target or a family is
editing this table plus a test, never an `if` elsewhere.

Facts behind the rules (read from vllm-project/vllm
`vllm/model_executor/models/nemotron_nas.py` and ggml-org/llama.cpp
`src/models/deci.cpp`, `src/llama-model.cpp`, `conversion/deci.py`):
  * Nemotron-NAS (DeciLM) keeps `hidden_size`, `num_attention_heads` and
    `head_dim` global; only the KV-head count varies per layer
    (`n_heads_in_group`). plancc's `attn drop groups` removes query heads with
    their KV head, so different counts across layers cannot be written.
  * vLLM reads a layer's FFN width from `ffn.ffn_mult` in every release with
    DeciLM (and llama.cpp's converter and NVIDIA's tools do too): width =
    int(2 * m * hidden / 3) rounded up to a multiple of 256, so only multiples
    of 256 are portable. vLLM after Dec 2025 (PR 30795) also reads
    `ffn.intermediate_size`, which `--format nemotron-nas` writes for other
    widths: such a result loads in transformers and new vLLM only.
  * Biases are global switches in vLLM (`attention_bias`, `qkv_bias`,
    `mlp_bias`), and its loader silently skips a checkpoint `.bias` it has no
    parameter for: an o_proj/down_proj bias added by `compensate` would vanish
    without an error.
  * llama.cpp reads per-layer `head_count`, `head_count_kv` and
    `feed_forward_length` arrays for the `deci` architecture, so per-layer
    head counts run there; a uniform result is written as the family's own
    GGUF architecture.

Documented, not checked (no plan can break them today): the first layer keeps
its attention (vLLM's fused residual and llama.cpp's head dimensions come from
it) and no layer loses its attention or its FFN (Nemotron-NAS `no_op`;
llama.cpp's `deci` graph computes a layer with attention but no FFN wrongly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from compiler import ir
from compiler.architectures import ARCHITECTURES
from compiler.cost import Loadability, stock_config_verdict
from compiler.diagnostics import CODES, Diagnostic, error
from compiler.resolve import LayerPlan, ResolvedPlan

# ---- the rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """What a violation points at, resolved to a span when the plan is at hand.

    The first statement of kind `kind` (`attn`, `mlp`, `moe`, or `shape`: any
    width statement) that decides one of `layers`, at its layer range (`at`
    = `layers`), its width (`width`) or its `compensate` keyword; else the
    first statement of that kind; else the model block's `fact` (`ffn` for
    widths left as the model has them, `arch` for the family).
    """

    kind: str
    layers: tuple[int, ...] = ()
    at: str = "layers"
    fact: str = "arch"


@dataclass(frozen=True)
class Violation:
    """One broken rule, before it is located in a plan file."""

    code: str
    message: str
    help: str
    where: Where
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One requirement of a target: its code, what it checks, and how it is found.

    `find` returns the violations of the resolved plan (none: the rule holds).
    `portable`: the target's format can express the result, only some
    versions of the runtime cannot read it; a writer of the format skips such
    rules (`verdict(..., format_only=True)`), `check --target` does not.
    """

    code: str
    name: str
    find: Callable[[Target, ResolvedPlan], list[Violation]]
    portable: bool = False

    @property
    def summary(self) -> str:
        """The code's line in the diagnostics table (one wording, one place)."""
        return CODES[self.code]


@dataclass(frozen=True)
class Layout:
    """The architecture a family is written as on one target, by result shape.

    `heterogeneous` None: the target's format cannot describe layers of
    different shapes for this family.
    """

    uniform: str
    heterogeneous: str | None


@dataclass(frozen=True)
class Target:
    """One place a result can be served: its format, families, facts and rules."""

    name: str
    what: str
    format: str  # what `plancc apply --format` writes for this target
    families: Mapping[str, Layout]  # architecture-table family -> layout
    rules: tuple[Rule, ...]
    # Facts writers and the planner read (rules read them too):
    # Every kept MLP width a multiple of this (1: any width) in the target's own format.
    ffn_multiple: int = 1
    per_layer_heads: bool = True  # query-head counts may differ across layers
    output_biases: bool = False  # o_proj/down_proj biases `compensate` adds can be written
    moe: bool = True  # mixture-of-experts families run
    # A result stock transformers loads also runs here as it is (`--format hf`).
    stock_first: bool = False
    needs: str = ""  # what the user adds at load time (e.g. `--trust-remote-code`)
    notes: tuple[str, ...] = field(default=())  # constraints documented, not checked

    def layout(self, resolved: ResolvedPlan) -> str | None:
        """The architecture this result is written as here (None: not expressible)."""
        arch = resolved.facts.arch
        family = self.families.get(arch.name) if arch else None
        if family is None:
            return None
        return family.uniform if resolved.uniform else family.heterogeneous


def _selection(layers: Iterable[int]) -> str:
    return str(ir.Selection.from_ints(sorted(set(layers))))


def _layers_word(layers: Iterable[int]) -> str:
    layers = sorted(set(layers))
    return f"layer{'s' * (len(layers) != 1)} {_selection(layers)}"


# Per-layer sizes a plan can change, with how a layer reports each (None: the
# layer has no such part) and how a size is named in messages.
_SLOTS: tuple[tuple[str, str, Callable[[LayerPlan], int | None], Callable[[int], str]], ...] = (
    (
        "attn",
        "KV-group count",
        lambda ly: len(ly.groups_kept),
        lambda v: f"{v} KV group{'s' * (v != 1)}",
    ),
    ("mlp", "MLP width", lambda ly: ly.ffn.width if ly.ffn else None, lambda v: f"width {v}"),
    (
        "moe",
        "expert count",
        lambda ly: len(ly.experts_kept) if ly.moe else None,
        lambda v: f"{v} experts",
    ),
    (
        "moe",
        "expert width",
        lambda ly: ly.expert_ffn.width if ly.moe and ly.expert_ffn else None,
        lambda v: f"expert width {v}",
    ),
    (
        "moe",
        "shared-expert width",
        lambda ly: ly.shared_ffn.width if ly.moe and ly.shared_ffn else None,
        lambda v: f"shared width {v}",
    ),
)


def _differing(
    resolved: ResolvedPlan, size: Callable[[LayerPlan], int | None], name: Callable[[int], str]
) -> tuple[str, tuple[int, ...]] | None:
    """When kept layers differ in one size: (`width 1024 in layers 4..6; width 1536
    in layers 0..3, 7..29`, the layers off the most common size), else None."""
    by_size: dict[int, list[int]] = {}
    for layer in resolved.kept:
        value = size(layer)
        if value is not None:
            by_size.setdefault(value, []).append(layer.index)
    if len(by_size) < 2:
        return None
    # most common size first (ties: the one the earliest layer has)
    ranked = sorted(by_size.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    parts = "; ".join(
        f"{name(v)} in {_layers_word(ix)}"
        for v, ix in sorted(by_size.items(), key=lambda kv: kv[1][0])
    )
    off = tuple(sorted(i for _, ix in ranked[1:] for i in ix))
    return parts, off


def _heterogeneous(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P140: layers differ in shape and the target's format has no per-layer form
    for this family (stock transformers: one config describes every layer)."""
    arch = resolved.facts.arch
    family = target.families.get(arch.name) if arch else None
    if resolved.uniform or family is None or family.heterogeneous is not None:
        return []
    out = []
    for part, what, size, name in _SLOTS:
        found = _differing(resolved, size, name)
        if found is None:
            continue
        parts, off = found
        fix = (
            "load the result with `executor.load` (the default `--format hf` records each "
            "layer's widths), or give every kept layer the same size"
        )
        if target.name != "stock":
            fix = f"give every kept layer the same {what}"
        out.append(
            Violation(
                "P140",
                f"the {what} differs across layers ({parts}): {target.what} needs one "
                "shape for every layer",
                fix,
                Where(part, off),
            )
        )
    return out


def _added_bias(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P141: `compensate` adds an o_proj/down_proj bias the family does not have."""
    if target.output_biases:
        return []
    facts = resolved.facts
    attn = [ly.index for ly in resolved.kept if ly.attn_compensate and not facts.o_bias]
    mlp = [ly.index for ly in resolved.kept if ly.ffn_compensate and not facts.mlp_bias]
    why = {
        "stock": "the stock config has no switch for a bias only some projections have",
        "vllm": "Nemotron-NAS biases are global switches, and vLLM silently skips a "
        "checkpoint bias it has no parameter for",
    }.get(target.name, f"{target.what} has no per-layer output bias")
    out = []
    for kind, layers, proj in (("attn", attn, "o_proj"), ("mlp", mlp, "down_proj")):
        if layers:
            out.append(
                Violation(
                    "P141",
                    f"`compensate` adds a {proj} bias in {_layers_word(layers)}, which "
                    f"{target.what} cannot load: {why}",
                    "remove `compensate` (or use `reconstruct`, which needs no bias)"
                    + (
                        ", or load the result with `executor.load`"
                        if target.name == "stock"
                        else ""
                    ),
                    Where(kind, tuple(layers), at="compensate"),
                )
            )
    return out


def _config_class(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P142: the family's transformers config class refuses the uniform result's
    shapes (asked of the class itself, memoized on disk: `compiler.cost`)."""
    facts = resolved.facts
    if not resolved.uniform or facts.arch is None:
        return []  # P140 says why; a config describes uniform layers only
    accepted = _stock_config(resolved)
    if accepted.stock:
        return []
    groups = {len(ly.groups_kept) for ly in resolved.kept}
    touched = groups != {facts.kv_heads}
    return [
        Violation(
            "P142",
            accepted.reason.removeprefix("not stock-loadable: "),
            "drop a number of KV groups the config class accepts (e.g. a hidden size that is "
            "a multiple of the heads left), or load the result with `executor.load`"
            if touched
            else "load the result with `executor.load`",
            Where("attn" if touched else "arch", tuple(ly.index for ly in resolved.kept)),
        )
    ]


def _stock_config(resolved: ResolvedPlan) -> Loadability:
    """What the family's config class says of the first kept layer's shapes."""
    facts = resolved.facts
    assert facts.arch is not None
    layer = resolved.kept[0]
    return stock_config_verdict(
        facts.arch.model_types[0],
        facts.hidden or 0,
        layer.heads_kept(facts),
        len(layer.groups_kept),
        facts.head_dim or 0,
    )


def _family(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P143: the target has no layout for this dense family."""
    arch = resolved.facts.arch
    if arch is None or arch.moe or arch.name in target.families:
        return []
    runs = ", ".join(sorted(target.families))
    return [
        Violation(
            "P143",
            f"{target.what} cannot take `{arch.name}` results: `--format {target.format}` "
            f"writes {runs} only (their tensors map one to one onto its own)",
            "serve this family with another target (`plancc check --target stock` says "
            "whether stock transformers loads the result)",
            Where("arch"),
        )
    ]


def _moe(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P144: mixture-of-experts layers on a target that has none."""
    arch = resolved.facts.arch
    if target.moe or arch is None or not arch.moe:
        return []
    return [
        Violation(
            "P144",
            f"`{arch.name}` has mixture-of-experts layers, which `--format {target.format}` "
            f"for {target.what} does not write",
            "keep every MoE layer's expert count and widths equal, so that stock transformers "
            "loads the result (`--target stock`; vLLM then runs it as it is), or load it with "
            "`executor.load`",
            Where("moe", tuple(ly.index for ly in resolved.kept if ly.moe)),
        )
    ]


def _per_layer_heads(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P145: query-head counts differ across layers where the target keeps them global."""
    if target.per_layer_heads:
        return []
    per_group = resolved.facts.group_size or 1
    found = _differing(
        resolved,
        lambda ly: len(ly.groups_kept),
        lambda v: f"{v * per_group} heads ({v} KV group{'s' * (v != 1)})",
    )
    if found is None:
        return []
    parts, off = found
    family = resolved.facts.arch.name if resolved.facts.arch else ""
    others = [
        t.name
        for t in TARGETS.values()
        if t.per_layer_heads and t.name != "stock" and family in t.families
    ]
    instead = f", or target {' or '.join(others)}" if others else ""
    return [
        Violation(
            "P145",
            f"`attn drop groups` leaves a different number of heads per layer ({parts}): it "
            f"removes query heads with their KV head, and {target.what} keeps the query-head "
            "count global (only KV heads may vary per layer)",
            "keep attention uniform across layers (drop the same number of KV groups in every "
            f"kept layer){instead}",
            Where("attn", off),
        )
    ]


def _ffn_multiple(target: Target, resolved: ResolvedPlan) -> list[Violation]:
    """P146: a kept MLP width that is not a multiple of the target's `ffn_multiple`."""
    m = target.ffn_multiple
    if m <= 1:
        return []
    bad: dict[int, list[int]] = {}
    for layer in resolved.kept:
        if layer.ffn is not None and layer.ffn.width % m:
            bad.setdefault(layer.ffn.width, []).append(layer.index)
    out = []
    original = resolved.facts.ffn or 0
    for width, layers in sorted(bad.items(), key=lambda kv: kv[1][0]):
        lo, hi = nearest_widths(target.name, width, max(original, width))
        options = " or ".join(str(w) for w in (lo, hi) if w is not None)
        out.append(
            Violation(
                "P146",
                f"width {width} in {_layers_word(layers)} is not a multiple of {m}: "
                f"{target.what} states each layer's width as `ffn_mult`, which gives "
                f"multiples of {m} only",
                f"use width {options}"
                if options
                else f"no width up to {original} is a multiple of {m}: keep this family's "
                "MLP whole, or target another runtime",
                Where("mlp", tuple(layers), at="width", fact="ffn"),
                (
                    "vLLM after Dec 2025 (PR 30795) also reads `ffn.intermediate_size`, which "
                    "`--format nemotron-nas` writes for such widths: that result loads in "
                    "transformers and new vLLM, not in older vLLM or llama.cpp's converter",
                ),
            )
        )
    return out


HETEROGENEOUS = Rule("P140", "shape", _heterogeneous)
ADDED_BIAS = Rule("P141", "compensate", _added_bias)
CONFIG_CLASS = Rule("P142", "config class", _config_class)
FAMILY = Rule("P143", "family", _family)
MOE = Rule("P144", "moe", _moe)
PER_LAYER_HEADS = Rule("P145", "heads", _per_layer_heads)
FFN_MULTIPLE = Rule("P146", "ffn multiple", _ffn_multiple, portable=True)


# ---- the table ------------------------------------------------------------------------

# Families whose tensors map 1:1 onto DeciLM's (Llama layout: q/k/v/o, gate/up/down,
# two RMSNorms). Qwen2's q/k/v biases are DeciLM's global `qkv_bias` (vLLM reads it;
# `attention_bias` false keeps o_proj bias-free).
_DECI_FAMILIES = ("llama", "mistral", "qwen2")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="stock",
            what="stock transformers `AutoModelForCausalLM.from_pretrained`",
            format="hf",
            families={a.name: Layout(a.model_types[0], None) for a in ARCHITECTURES.values()},
            rules=(HETEROGENEOUS, ADDED_BIAS, CONFIG_CLASS),
            notes=(
                "a result outside these rules is still written as `--format hf` and loads "
                "with `executor.load` (its per-layer widths under the config's `plancc` key)",
            ),
        ),
        Target(
            name="vllm",
            what="Nemotron-NAS (vLLM's DeciLMForCausalLM)",
            format="nemotron-nas",
            families={f: Layout("DeciLMForCausalLM", "DeciLMForCausalLM") for f in _DECI_FAMILIES},
            rules=(FAMILY, MOE, PER_LAYER_HEADS, FFN_MULTIPLE, ADDED_BIAS),
            ffn_multiple=256,
            per_layer_heads=False,
            moe=False,
            stock_first=True,
            needs="--trust-remote-code",
            notes=(
                "a result stock transformers loads runs in vLLM as it is (`--format hf`)",
                "widths that are not multiples of 256 load through `ffn.intermediate_size` "
                "in transformers and vLLM after Dec 2025 (PR 30795) only",
                "the first layer keeps attention and no layer is a no-op: always true of plans",
            ),
        ),
        Target(
            name="llamacpp",
            what="llama.cpp",
            format="gguf",
            # llama.cpp's `deci` loader also takes optional per-layer q/k/v biases (so
            # qwen2 could be `deci` when heterogeneous, `qwen2` when uniform), but the
            # GGUF writer does not write qwen2 yet: a family is listed once it does.
            families={"llama": Layout("llama", "deci"), "mistral": Layout("llama", "deci")},
            rules=(FAMILY, MOE, HETEROGENEOUS, ADDED_BIAS),
            moe=False,
            # llama.cpp loads optional `attn_output.bias` / `ffn_down.bias` in both its
            # `llama` and `deci` graphs, and the GGUF writer writes them (tested there).
            output_biases=True,
            notes=(
                "k-quants need MLP widths that are multiples of 256 (llama-quantize falls back "
                "to another type for other tensors); f16/bf16/f32 take any width",
                "a `deci` layer with attention but no FFN computes wrongly in llama.cpp: "
                "plans make none (the writer pads the last layer's FFN if ever needed)",
            ),
        ),
    )
}
TARGET_NAMES = tuple(TARGETS)
ANY = "any"  # `check --target any`: no target's rules are errors


# ---- verdicts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a result runs on one target, how, and if not, every reason.

    `format` and `arch`: what a writer produces for it (e.g. `gguf` / `deci`),
    None when it does not run. `reason`: how it runs, or the first violation's
    message. `diagnostics`: one error per violation, located when the plan
    was given to `verdict`.
    """

    target: str
    runs: bool
    reason: str
    format: str | None
    arch: str | None
    diagnostics: tuple[Diagnostic, ...] = ()

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(d.code for d in self.diagnostics)


def verdict(
    resolved: ResolvedPlan,
    target: str,
    plan: ir.Plan | None = None,
    *,
    format_only: bool = False,
) -> Verdict:
    """Does the result run on `target`? With `plan`, diagnostics point at statements.

    `format_only` is the writer's question, "can `TARGETS[target].format`
    express this result?": `portable` rules are skipped and a stock-loadable
    result is not waved through as `hf`.
    """
    t = TARGETS.get(target)
    if t is None:
        raise ValueError(f"unknown serving target {target!r}: one of {', '.join(TARGETS)}")
    if t.stock_first and not format_only:
        stock = verdict(resolved, "stock")
        if stock.runs:
            arch = resolved.facts.arch
            return Verdict(
                target,
                True,
                "as it is (`--format hf`): stock transformers loads it, and vLLM runs "
                "what stock transformers loads",
                "hf",
                arch.model_types[0] if arch else None,
            )
    rules = [r for r in t.rules if not (format_only and r.portable)]
    found = [v for rule in rules for v in rule.find(t, resolved)]
    diags = tuple(_locate(v, plan) for v in found)
    if found:
        return Verdict(target, False, found[0].message, None, None, diags)
    return Verdict(target, True, _how(t, resolved), t.format, t.layout(resolved))


def loadability(resolved: ResolvedPlan) -> Loadability:
    """Can stock `AutoModelForCausalLM.from_pretrained` load the result?

    The `stock` serving target's verdict: one shape for
    every layer, no bias that `compensate` adds, and the family's transformers
    config class accepts the shapes (asked of the class, never assumed: e.g.
    transformers 5 `LlamaConfig` refuses a `hidden_size` that is not a multiple
    of `num_attention_heads`).
    """
    stock = verdict(resolved, "stock")
    if stock.runs:
        return Loadability(True, stock.reason)
    return Loadability(False, f"{stock.reason}; load with executor.load")


def verdicts(resolved: ResolvedPlan, plan: ir.Plan | None = None) -> dict[str, Verdict]:
    """Every target's verdict, in table order (the cost report's `targets` list)."""
    return {name: verdict(resolved, name, plan) for name in TARGETS}


def target_diagnostics(resolved: ResolvedPlan, target: str, plan: ir.Plan) -> list[Diagnostic]:
    """The located errors `plancc check --target TARGET` adds (none for `any`)."""
    if target == ANY:
        return []
    return list(verdict(resolved, target, plan).diagnostics)


def _how(t: Target, resolved: ResolvedPlan) -> str:
    if t.name == "stock":
        return _stock_config(resolved).reason
    needs = f", {t.needs}" if t.needs else ""
    return f"as `{t.layout(resolved)}` (`--format {t.format}`{needs})"


# ---- widths the planner can aim at ----------------------------------------------------


def nearest_widths(target: str, width: int, original: int) -> tuple[int | None, int | None]:
    """The allowed MLP widths at or below and at or above `width` on `target`.

    Allowed: a multiple of the target's `ffn_multiple` in 1..`original` (a plan
    never widens a layer). `(w, w)` when `width` itself is allowed; None on a
    side with no allowed width (e.g. nothing above `original`).
    """
    m = TARGETS[target].ffn_multiple
    top = original - original % m
    down = min(width - width % m, top)
    up = -(-width // m) * m
    return (down if down >= max(m, 1) else None, up if up <= top and up >= m else None)


def round_width(target: str, width: int, original: int) -> int | None:
    """The allowed width nearest to `width` on `target` (ties: the larger, which
    removes less), or None when the target allows none up to `original`."""
    lo, hi = nearest_widths(target, width, original)
    if lo is None or hi is None:
        return hi if lo is None else lo
    return hi if hi - width <= width - lo else lo


# ---- locating violations in the plan --------------------------------------------------


def _span_of(sel: ir.Selection, layers: set[int]) -> ir.Span:
    """The span of the first range of `sel` that holds one of `layers`."""
    return next((r.span for r in sel.ranges if any(r.lo <= i <= r.hi for i in layers)), sel.span)


_MOE_KINDS = (ir.MoeDropExperts, ir.MoeExpertsWidth, ir.MoeSharedWidth)
_KINDS: dict[str, tuple[type[ir.Statement], ...]] = {
    "attn": (ir.AttnDropGroups,),
    "mlp": (ir.MlpWidth,),
    "moe": _MOE_KINDS,
    "shape": (ir.AttnDropGroups, ir.MlpWidth, *_MOE_KINDS),
}


def _locate(v: Violation, plan: ir.Plan | None) -> Diagnostic:
    return replace(error(v.code, v.message, _span(v.where, plan), v.help), notes=v.notes)


def _span(where: Where, plan: ir.Plan | None) -> ir.Span:
    """The span `where` names in `plan` (see `Where`); NOWHERE without a plan."""
    if plan is None:
        return ir.NOWHERE
    kinds = _KINDS.get(where.kind, ())
    wanted = set(where.layers)
    statements = [
        st
        for st in plan.statements
        if isinstance(st, kinds) and (where.at != "compensate" or getattr(st, "compensate", False))
    ]
    hit = next((st for st in statements if wanted & set(st.layers)), None)
    if hit is not None:
        if where.at == "compensate":
            return hit.compensate_span  # type: ignore[attr-defined]
        if where.at == "width":
            return hit.width.span  # type: ignore[attr-defined]
        return _span_of(hit.layers, wanted)
    if where.fact == "arch" and statements:
        return statements[0].layers.span
    block = plan.model
    fact = block.fact(where.fact) if block is not None else None
    if fact is not None:
        return fact.value_span
    return block.span if block is not None else ir.NOWHERE
