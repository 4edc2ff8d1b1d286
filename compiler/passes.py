"""Validation passes: one function per invariant, listed in order in `PASSES`.

Each pass reads the plan and the typed model facts and returns diagnostics;
none stops the others, so one run reports every problem. A pass never assumes
another has succeeded: indices outside the model are ignored here (the
`selections` pass reports them), missing facts make a pass skip what it cannot
judge (the `required_facts` pass reports them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from compiler import ir
from compiler.cost import cost, original
from compiler.diagnostics import Diagnostic, error, warning
from compiler.facts import ModelFacts
from compiler.resolve import resolve
from compiler.sidecar import (
    NeededTable,
    SidecarError,
    SidecarHeader,
    describe_decision,
    layer_decisions,
    read_sidecar_tables,
    required_tables,
)


@dataclass(frozen=True)
class Context:
    plan: ir.Plan
    facts: ModelFacts
    base_dir: Path | None  # where relative sidecar paths are resolved

    def layers(self, st: ir.Statement) -> list[int]:
        """The statement's layers that exist in the model, in order, each once.

        A layer listed twice (P103) is still one decision of this statement: the
        other passes neither count it twice nor see it as a second decision.
        """
        return list(dict.fromkeys(st.layers.within(self.facts.layers or 0)))

    def of(self, kind: type[ir.Statement]) -> list[ir.Statement]:
        return [st for st in self.plan.statements if isinstance(st, kind)]

    def dropped(self) -> set[int]:
        return {i for st in self.of(ir.DropLayers) for i in self.layers(st)}


def span_of(sel: ir.Selection, index: int) -> ir.Span:
    """The span of the range in `sel` that contains `index`."""
    return next((r.span for r in sel.ranges if r.lo <= index <= r.hi), sel.span)


def fmt_indices(indices: Iterable[int]) -> str:
    return str(ir.Selection.from_ints(sorted(set(indices))))


def _plural(word: str, n: object) -> str:
    return word if n == 1 else word + "s"


# ---- passes ------------------------------------------------------------------------


def check_required_facts(ctx: Context) -> list[Diagnostic]:
    """P101: a statement needs a model fact the block does not state."""
    f = ctx.facts
    needs: dict[type, tuple[tuple[str, object], ...]] = {
        ir.AttnDropGroups: (("heads", f.heads), ("kv_heads", f.kv_heads)),
        ir.MlpWidth: (("ffn", f.ffn),),
        ir.MoeDropExperts: (("experts", f.experts), ("top_k", f.top_k)),
        ir.MoeExpertsWidth: (("experts", f.experts), ("expert_ffn", f.expert_ffn)),
        ir.MoeSharedWidth: (("experts", f.experts), ("shared_ffn", f.shared_ffn or None)),
    }
    out = []
    for st in ctx.plan.statements:
        for fact, value in needs.get(type(st), ()):
            if value is None:
                out.append(
                    error(
                        "P101",
                        f"`{st.kind}` needs the model fact `{fact}`, which the model block "
                        "does not state",
                        st.span,
                        f"add `{fact} N` to the model block (`plangen header` prints it)",
                    )
                )
                break
    return out


def check_selections(ctx: Context) -> list[Diagnostic]:
    """P102 reversed ranges, P103 repeated indices, P104 indices out of range."""
    f = ctx.facts
    out: list[Diagnostic] = []

    def visit(sel: ir.Selection, what: str, limit: int | None, limit_text: str) -> None:
        # Ranges are sorted by (lo, hi), so a range repeats an index iff it starts
        # at or before the highest end seen so far (one pass, no pairwise scan).
        reach: int | None = None
        for r in sel.ranges:
            if r.lo > r.hi:
                out.append(
                    error(
                        "P102",
                        f"range {r.lo}..{r.hi} is reversed",
                        r.span,
                        f"write `{r.hi}..{r.lo}`",
                    )
                )
                continue
            if limit is not None and r.hi >= limit:
                bad = r.hi if r.lo == r.hi or r.lo < limit else r.lo
                out.append(
                    error(
                        "P104",
                        f"{what} {bad} is out of range: the model has {limit} "
                        f"{_plural(what, limit)} ({limit_text})",
                        r.span,
                    )
                )
            if reach is not None and r.lo <= reach:
                out.append(
                    error("P103", f"{what} {r.lo} is listed twice", r.span, "list every index once")
                )
            reach = r.hi if reach is None else max(reach, r.hi)

    def range_text(n: int | None) -> str:
        return f"0..{n - 1}" if n else "none"

    for st in ctx.plan.statements:
        visit(st.layers, "layer", f.layers, range_text(f.layers))
        if isinstance(st, ir.AttnDropGroups):
            visit(st.groups, "group", f.kv_heads, f"groups 0..{(f.kv_heads or 1) - 1}")
        if isinstance(st, ir.MoeDropExperts):
            visit(st.experts, "expert", f.experts, f"experts 0..{(f.experts or 1) - 1}")
    return out


SLOTS: dict[type, str] = {
    ir.DropLayers: "drop",
    ir.AttnDropGroups: "attn",
    ir.MlpWidth: "mlp width",
    ir.MoeDropExperts: "expert drop",
    ir.MoeExpertsWidth: "experts width",
    ir.MoeSharedWidth: "shared width",
}


def check_conflicts(ctx: Context) -> list[Diagnostic]:
    """P105: two statements decide the same thing for one layer."""
    owner: dict[tuple[str, int], ir.Statement] = {}
    out = []
    for st in ctx.plan.statements:
        slot = SLOTS.get(type(st))
        if slot is None:
            continue
        clashes: dict[int, list[int]] = {}
        for i in ctx.layers(st):
            first = owner.setdefault((slot, i), st)
            if first is not st:
                clashes.setdefault(first.span.line, []).append(i)
        for line, idx in clashes.items():
            out.append(
                error(
                    "P105",
                    f"{_plural('layer', len(idx))} {fmt_indices(idx)} already "
                    f"{'has' if len(idx) == 1 else 'have'} a `{slot}` decision on line {line}",
                    span_of(st.layers, idx[0]),
                    "a plan is declarative: state each decision once",
                )
            )
    return out


def check_drops(ctx: Context) -> list[Diagnostic]:
    """P107 all layers dropped, P108 a guarded layer dropped, W001 the last layer."""
    n = ctx.facts.layers
    if not n:
        return []
    out = []
    guarded = {i for st in ctx.of(ir.KeepLayers) for i in ctx.layers(st)}
    drops = ctx.of(ir.DropLayers)
    for st in drops:
        hit = [i for i in ctx.layers(st) if i in guarded]
        if hit:
            out.append(
                error(
                    "P108",
                    f"{_plural('layer', len(hit))} {fmt_indices(hit)} "
                    f"{'is' if len(hit) == 1 else 'are'} guarded by `keep layers` "
                    "and cannot be dropped",
                    span_of(st.layers, hit[0]),
                    "remove them from this statement, or from `keep layers`",
                )
            )
    dropped = ctx.dropped()
    if drops and len(dropped) == n:
        out.append(
            error(
                "P107",
                f"every layer is dropped ({n} of {n}): the model would have no decoder",
                drops[-1].layers.span,
                "keep at least one layer",
            )
        )
    elif n - 1 in dropped:
        st = next(s for s in drops if n - 1 in ctx.layers(s))
        out.append(
            warning(
                "W001",
                f"the last layer ({n - 1}) is dropped; it usually matters most for the output",
                span_of(st.layers, n - 1),
                f"consider `keep layers {n - 1}`",
            )
        )
    return out


# W006 fires when a plan removes more than this fraction of the model's layers
# or parameters (its help states the threshold; keep the two in step).
MOST_OF_THE_MODEL = 0.5
W006_HELP = (
    "W006 warns when a plan removes more than half the layers or half the parameters; "
    "quality rarely survives that without retraining. Check the plan says what you "
    "meant (`keep layers` where `drop layers` was written?), and measure it with "
    "`plancc eval`"
)


def check_removal(ctx: Context) -> list[Diagnostic]:
    """W006: the plan removes most of the model (more than half its layers, or
    more than half its parameters by the cost model, embeddings included).

    Such a plan is legal, and `check` would otherwise say "no problems found"
    on a typo that leaves 2 of 30 layers. Every layer dropped is P107, not this.
    """
    f, n = ctx.facts, ctx.facts.layers
    pruning = [st for st in ctx.plan.statements if not isinstance(st, ir.KeepLayers | ir.Bundle)]
    if not n or not pruning:
        return []
    dropped = len(ctx.dropped())
    if dropped >= n:
        return []  # P107
    if dropped > n * MOST_OF_THE_MODEL:
        first = next(st for st in pruning if isinstance(st, ir.DropLayers))
        return [
            warning(
                "W006",
                f"the plan drops {dropped} of {n} layers ({dropped / n:.0%}): "
                "most of the model is removed",
                first.span,
                W006_HELP,
            )
        ]
    if f.arch is None or check_conflicts(ctx):
        # Two decisions for one layer (P105): the parameter count would depend on
        # which one counts, so on the statements' order, which `fmt` changes; no verdict.
        return []
    before, after = cost(original(f)).params, cost(resolve(ctx.plan, f)).params
    if before and after < before * (1 - MOST_OF_THE_MODEL):
        return [
            warning(
                "W006",
                f"the plan removes {1 - after / before:.0%} of the parameters "
                f"({before:,} → {after:,}): most of the model is removed",
                pruning[0].span,
                W006_HELP,
            )
        ]
    return []


def check_dropped_targets(ctx: Context) -> list[Diagnostic]:
    """P106: width, group or expert statements on a layer that is dropped."""
    dropped = ctx.dropped()
    out = []
    for st in ctx.plan.statements:
        if type(st) not in SLOTS or isinstance(st, ir.DropLayers):
            continue
        hit = [i for i in ctx.layers(st) if i in dropped]
        if hit:
            out.append(
                error(
                    "P106",
                    f"`{st.kind}` applies to dropped {_plural('layer', len(hit))} "
                    f"{fmt_indices(hit)}",
                    span_of(st.layers, hit[0]),
                    "a dropped layer has nothing left to shrink: remove it from this statement",
                )
            )
    return out


def check_layer_kinds(ctx: Context) -> list[Diagnostic]:
    """P117: `mlp` on a MoE layer, or `moe` on a dense layer."""
    f = ctx.facts
    out = []
    for st in ctx.plan.statements:
        if isinstance(st, ir.MlpWidth) and f.is_moe:
            bad = [i for i in ctx.layers(st) if f.is_moe_layer(i)]
            fix = "use `moe layers ... experts width N` or `shared width N`"
            kind = "mixture-of-experts"
        elif isinstance(st, ir.MoeDropExperts | ir.MoeExpertsWidth | ir.MoeSharedWidth):
            if not f.is_moe:
                continue  # reported by check_required_facts
            bad = [i for i in ctx.layers(st) if not f.is_moe_layer(i)]
            fix = "use `mlp layers ... width N` for dense layers"
            kind = "dense"
        else:
            continue
        if bad:
            out.append(
                error(
                    "P117",
                    f"{_plural('layer', len(bad))} {fmt_indices(bad)} "
                    f"{'is' if len(bad) == 1 else 'are'} {kind}: `{st.kind}` does not apply",
                    span_of(st.layers, bad[0]),
                    fix,
                )
            )
    return out


def check_groups(ctx: Context) -> list[Diagnostic]:
    """P109: every KV group of a layer dropped (the layer would have no attention);
    P126: KV groups dropped in a family whose attention cannot be narrowed (MLA)."""
    kv = ctx.facts.kv_heads
    arch = ctx.facts.arch
    out = []
    for st in ctx.of(ir.AttnDropGroups):
        assert isinstance(st, ir.AttnDropGroups)
        if arch is not None and not arch.attention_sliceable:
            out.append(
                error(
                    "P126",
                    f"`{arch.name}` has multi-head latent attention, which is kept whole: "
                    "KV groups cannot be dropped",
                    st.span,
                    "drop layers or experts instead (`drop layers`, `moe ... drop experts`)",
                )
            )
            continue
        if kv and len(set(st.groups.within(kv))) >= kv:
            out.append(
                error(
                    "P109",
                    f"all {kv} KV groups are dropped: the layers would have no attention",
                    st.groups.span,
                    "drop the whole layer with `drop layers` instead",
                )
            )
    return out


def check_widths(ctx: Context) -> list[Diagnostic]:
    """P110 widths out of range; W003 not a multiple of 8; W004 width unchanged."""
    f = ctx.facts
    out = []
    for st in ctx.plan.statements:
        if isinstance(st, ir.MlpWidth):
            original, what = f.ffn, "ffn"
        elif isinstance(st, ir.MoeExpertsWidth):
            original, what = f.expert_ffn, "expert_ffn"
        elif isinstance(st, ir.MoeSharedWidth):
            original, what = f.shared_ffn or None, "shared_ffn"
        else:
            continue
        w = st.width  # type: ignore[attr-defined]
        if original is None:
            continue
        if w.n <= 0 or w.n > original:
            out.append(
                error(
                    "P110",
                    f"width {w.n} is outside 1..{original} (the model's {what} is {original})",
                    w.span,
                    "to remove an MLP entirely, drop the layer" if w.n <= 0 else None,
                )
            )
        elif w.n == original:
            out.append(
                warning(
                    "W004",
                    f"width {w.n} equals the model's {what}: this statement changes nothing",
                    w.span,
                    "remove the statement",
                )
            )
        elif w.n % 8:
            out.append(
                warning(
                    "W003",
                    f"width {w.n} is not a multiple of 8; matrix kernels run slower on it",
                    w.span,
                    _multiples_of_8_help(w.n, original),
                )
            )
    return out


def _multiples_of_8_help(width: int, original: int) -> str | None:
    """W003's fix: the multiples of 8 either side of `width` that are valid widths
    (at least 8, below the original: 0 is P110, the original changes nothing)."""
    below = width - width % 8
    usable = [w for w in (below, below + 8) if 0 < w < original]
    return "use " + " or ".join(map(str, usable)) if usable else None


def check_experts(ctx: Context) -> list[Diagnostic]:
    """P111 fewer experts than top_k; P112 group-routed counts not divisible."""
    f = ctx.facts
    if not f.experts:
        return []
    out = []
    for st in ctx.of(ir.MoeDropExperts):
        assert isinstance(st, ir.MoeDropExperts)
        left = f.experts - len(set(st.experts.within(f.experts)))
        if f.top_k and left < f.top_k:
            out.append(
                error(
                    "P111",
                    f"{left} {_plural('expert', left)} would be left, fewer than top_k {f.top_k}",
                    st.experts.span,
                    f"keep at least {f.top_k} experts per layer",
                )
            )
        if f.expert_groups and left % f.expert_groups:
            out.append(
                error(
                    "P112",
                    f"{left} experts left is not divisible by the {f.expert_groups} "
                    "expert groups the router selects from",
                    st.experts.span,
                    f"drop a multiple of {f.expert_groups} experts, spread over the groups",
                )
            )
        elif f.expert_groups and f.experts % f.expert_groups == 0:
            out += _unequal_groups(st, f.experts, f.expert_groups)
    return out


def _unequal_groups(st: ir.MoeDropExperts, experts: int, groups: int) -> list[Diagnostic]:
    """P112 when the drops leave the router's groups unequal: group-limited routing
    (DeepSeek's `n_group`) views the experts as `groups` consecutive blocks of equal
    size, so every block must lose the same number."""
    size = experts // groups
    gone = set(st.experts.within(experts))
    lost = [sum(1 for e in range(g * size, (g + 1) * size) if e in gone) for g in range(groups)]
    if len(set(lost)) == 1:
        return []
    per = ", ".join(
        f"group {g} (experts {g * size}..{(g + 1) * size - 1}) loses {n}"
        for g, n in enumerate(lost)
    )
    return [
        error(
            "P112",
            f"the expert groups the router selects from would become unequal: {per}",
            st.experts.span,
            f"drop {len(gone) // groups} {_plural('expert', len(gone) // groups)} "
            f"from each group of {size}",
        )
    ]


def check_bundles(ctx: Context) -> list[Diagnostic]:
    """P113-P116: bundles hold dropped layers, each exactly once, all of them."""
    bundles = ctx.of(ir.Bundle)
    if not bundles:
        return []
    dropped = ctx.dropped()
    out = []
    owner: dict[int, ir.Bundle] = {}
    names: dict[str, ir.Bundle] = {}
    for st in bundles:
        assert isinstance(st, ir.Bundle)
        if st.name in names:
            out.append(
                error(
                    "P116",
                    f"bundle {st.name} is declared twice (first on line "
                    f"{names[st.name].span.line})",
                    st.name_span,
                    "list all its layers in one statement",
                )
            )
        names.setdefault(st.name, st)
        idx = ctx.layers(st)
        missing = [i for i in idx if i not in dropped]
        if missing:
            out.append(
                error(
                    "P113",
                    f"bundle {st.name} names {_plural('layer', len(missing))} "
                    f"{fmt_indices(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                    "not dropped",
                    span_of(st.layers, missing[0]),
                    "bundles hold dropped layers only",
                )
            )
        shared = [i for i in idx if i in owner]
        if shared:
            out.append(
                error(
                    "P114",
                    f"{_plural('layer', len(shared))} {fmt_indices(shared)} "
                    f"{'is' if len(shared) == 1 else 'are'} already in bundle "
                    f"{owner[shared[0]].name}",
                    span_of(st.layers, shared[0]),
                    "each dropped layer goes to exactly one bundle",
                )
            )
        for i in idx:
            owner.setdefault(i, st)
    uncovered = sorted(dropped - set(owner))
    if uncovered:
        out.append(
            error(
                "P115",
                f"dropped {_plural('layer', len(uncovered))} {fmt_indices(uncovered)} "
                f"{'is' if len(uncovered) == 1 else 'are'} in no bundle",
                bundles[-1].span,
                f"add them to a bundle, e.g. `bundle C layers {fmt_indices(uncovered)}`",
            )
        )
    return out


def check_heterogeneous(ctx: Context) -> list[Diagnostic]:
    """W002: kept layers end up with different shapes (needs the plancc loader).

    Per kind of decision, every kept layer of the matching kind (dense or MoE)
    gets its resulting size (KV groups dropped, experts dropped, or width kept,
    the original when untouched); more than one distinct size is heterogeneous.
    Which groups or experts are dropped does not matter, only how many.
    """
    f = ctx.facts
    dropped = ctx.dropped()
    kept = [i for i in range(f.layers or 0) if i not in dropped]
    out = []
    for slot_type, slot in SLOTS.items():
        if slot_type is ir.DropLayers:
            continue
        statements = [st for st in ctx.plan.statements if isinstance(st, slot_type)]
        if not statements:
            continue
        moe = slot_type in (ir.MoeDropExperts, ir.MoeExpertsWidth, ir.MoeSharedWidth)
        default = _untouched_size(slot_type, f)
        size = {i: default for i in kept if f.is_moe_layer(i) == moe}
        claimed: set[int] = set()
        for st in statements:
            value = _resulting_size(st, f)
            for i in ctx.layers(st):
                if i in claimed:  # two decisions for one layer: P105 says so; no verdict
                    size = {}
                claimed.add(i)
                if i in size:
                    size[i] = value
        by_size: dict[object, list[int]] = {}
        for i, v in size.items():
            by_size.setdefault(v, []).append(i)
        if len(by_size) > 1:
            parts = "; ".join(
                f"{_size_text(slot_type, v)} in {_plural('layer', len(ix))} {fmt_indices(ix)}"
                for v, ix in sorted(by_size.items(), key=lambda kv: kv[1][0])
            )
            out.append(
                warning(
                    "W002",
                    f"`{slot}` differs across layers ({parts}): the result is heterogeneous; "
                    "stock `from_pretrained` cannot load it; the report's targets say where "
                    "it runs (`--format nemotron-nas` for vLLM, `gguf` for llama.cpp)",
                    statements[0].layers.span,
                )
            )
    return out


def _untouched_size(slot_type: type, f: ModelFacts) -> object:
    return {
        ir.MlpWidth: f.ffn,
        ir.MoeExpertsWidth: f.expert_ffn,
        ir.MoeSharedWidth: f.shared_ffn,
    }.get(slot_type, 0)


def _resulting_size(st: ir.Statement, f: ModelFacts) -> object:
    match st:
        case ir.AttnDropGroups(groups=groups):
            return len(set(groups.within(f.kv_heads or 0)))
        case ir.MoeDropExperts(experts=experts):
            return len(set(experts.within(f.experts or 0)))
        case ir.MlpWidth(width=w) | ir.MoeExpertsWidth(width=w) | ir.MoeSharedWidth(width=w):
            return w.n
    return None  # pragma: no cover - SLOTS lists only the kinds above


def _size_text(slot_type: type, value: object) -> str:
    if slot_type is ir.AttnDropGroups:
        return f"{value} {_plural('group', value)} dropped"  # type: ignore[arg-type]
    if slot_type is ir.MoeDropExperts:
        return f"{value} {_plural('expert', value)} dropped"  # type: ignore[arg-type]
    return f"width {value}"


def check_sidecar(ctx: Context) -> list[Diagnostic]:
    """P120-P124: metrics, `compensate` and `reconstruct` need their tables in the
    pinned sidecar, and reconstructed weights must have been solved for this plan."""
    needed = required_tables(ctx.plan, ctx.facts)
    if not needed:
        return []
    scores = ctx.plan.scores
    if scores is None:  # one diagnostic per `by METRIC` / `compensate` that needs it
        spans = {(need.span, need.reason): None for need in needed}
        return [
            error(
                "P120",
                f"`{reason}` needs a scores sidecar, and the plan names none",
                span,
                'add `scores "FILE.safetensors" sha256 "..."` (plangen analyze writes it), '
                "or use `by magnitude`",
            )
            for span, reason in spans
        ]
    path = Path(scores.path)
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    try:
        header = read_sidecar_tables(path)
        sha, shapes = header.sha256, header.shapes
    except SidecarError as exc:
        return [error("P123", str(exc), scores.span, "generate it with `plangen analyze`")]
    out = []
    if sha != scores.sha256.removeprefix("sha256:"):
        out.append(
            error(
                "P121",
                f"sidecar {scores.path} has sha256 {sha}, the plan pins {scores.sha256}",
                scores.sha_span,
                "the scores changed since the plan was written: re-run `plangen analyze`, "
                "or update the pin if the change is intended",
            )
        )
    reported: set[tuple[str, int]] = set()
    for need in needed:
        key = (need.table, need.span.line)
        if key in reported:
            continue
        if need.table not in shapes:
            reported.add(key)
            out.append(
                error(
                    "P120",
                    f"the sidecar has no table `{need.table}` (needed by `{need.reason}`)",
                    need.span,
                    "tables present: " + ", ".join(sorted({k.split(".")[0] for k in shapes})),
                )
            )
        elif shapes[need.table] != need.shape:
            reported.add(key)
            out.append(_shape_mismatch(need, shapes[need.table]))
    out += _stale_reconstruction(ctx, header)
    out += _measured_on_other_weights(ctx, header)
    return out


# What to do about weights solved for another version of the plan (P122, P124).
RESOLVE_AGAIN_HELP = (
    "re-solve the reconstruction for this plan with `plangen reconstruct PLAN.prn`, "
    "or remove `reconstruct` to slice the original weights"
)


def _shape_mismatch(need: NeededTable, have: tuple[int, ...]) -> Diagnostic:
    """P122, with the fix for its cause. A reconstructed table is (hidden, kept
    width): when only the kept width differs, the plan's width or KV groups were
    edited after the weights were solved, and re-running analyze would throw the
    edit away; any other mismatch means the sidecar describes another model."""
    if need.reason == "reconstruct" and have[:1] == need.shape[:1]:
        edited = "KV groups" if need.table.endswith(".attn") else "width"
        return error(
            "P122",
            f"sidecar table `{need.table}` has shape {list(have)}, this plan needs "
            f"{list(need.shape)}: the weights were solved for another {edited}",
            need.span,
            RESOLVE_AGAIN_HELP,
        )
    return error(
        "P122",
        f"sidecar table `{need.table}` has shape {list(have)}, the model needs {list(need.shape)}",
        need.span,
        "the sidecar was made for another model: re-run `plangen analyze`",
    )


def _stale_reconstruction(ctx: Context, header: SidecarHeader) -> list[Diagnostic]:
    """P124: a layer's reconstruction is solved on the outputs of the layers before it
    as the plan had them pruned, so an edit to any of them makes it stale."""
    statements = [
        st
        for st in ctx.plan.statements
        if isinstance(st, ir.AttnDropGroups | ir.MlpWidth) and st.reconstruct
    ]
    if not statements:
        return []
    solved_for = header.reconstructed_for()
    help_text = RESOLVE_AGAIN_HELP
    if solved_for is None:
        return [
            error(
                "P124",
                "the sidecar does not record the plan its reconstructed weights were solved for",
                st.reconstruct_span,
                help_text,
            )
            for st in statements
        ]
    now = layer_decisions(ctx.plan, ctx.facts)
    changed = [i for i in range(ctx.facts.layers or 0) if now.get(str(i)) != solved_for.get(str(i))]
    if not changed:
        return []
    first = changed[0]
    out = []
    for st in statements:
        stale = [i for i in ctx.layers(st) if i >= first]
        if not stale:
            continue
        out.append(
            error(
                "P124",
                f"the reconstructed weights of layers {fmt_indices(stale)} were solved for "
                f"another plan: layer {first} was {describe_decision(solved_for.get(str(first)))}, "
                f"this plan has it {describe_decision(now.get(str(first)))} (each layer is "
                "solved on the outputs of the layers before it)",
                st.reconstruct_span,
                help_text,
            )
        )
    return out


def _measured_on_other_weights(ctx: Context, header: SidecarHeader) -> list[Diagnostic]:
    """P127: the sidecar records the weights digest it was measured on
    (`compiler.checkpoint.weights_digest`); a plan that states `weights` must
    agree, or its scores (and reconstructed weights) belong to another model."""
    stated = ctx.facts.weights
    recorded = header.weights()
    if not stated or not recorded or stated == recorded:
        return []
    fact = ctx.plan.model.fact("weights") if ctx.plan.model else None
    return [
        error(
            "P127",
            f"the sidecar was measured on weights {recorded}, the plan states {stated}",
            fact.value_span if fact else ctx.plan.scores.span,  # type: ignore[union-attr]
            "the plan and the sidecar come from different checkpoints: re-run "
            "`plangen analyze` on the checkpoint you mean to apply it to",
        )
    ]


def check_reconstruct(ctx: Context) -> list[Diagnostic]:
    """P125: `reconstruct` re-fits the kept columns to the whole original output,
    the removed part's mean included; a `compensate` bias on top counts it twice."""
    return [
        error(
            "P125",
            "`compensate` and `reconstruct` on one statement: the reconstruction already "
            "fits what the removed channels contributed",
            st.compensate_span,
            "keep `reconstruct` and remove `compensate`",
        )
        for st in ctx.plan.statements
        if isinstance(st, ir.AttnDropGroups | ir.MlpWidth) and st.compensate and st.reconstruct
    ]


Pass = Callable[[Context], list[Diagnostic]]

# The pipeline, in order: the table of contents of `plancc check`.
PASSES: tuple[tuple[str, Pass], ...] = (
    ("required facts", check_required_facts),
    ("selections", check_selections),
    ("layer kinds", check_layer_kinds),
    ("conflicts", check_conflicts),
    ("drops", check_drops),
    ("removal", check_removal),
    ("dropped targets", check_dropped_targets),
    ("groups", check_groups),
    ("widths", check_widths),
    ("experts", check_experts),
    ("bundles", check_bundles),
    ("heterogeneity", check_heterogeneous),
    ("reconstruct", check_reconstruct),
    ("sidecar", check_sidecar),
)
