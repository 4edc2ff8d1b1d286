"""The fully resolved plan: one frozen decision record per original layer.

The checker proves a plan valid; `resolve` then turns its statements into
what the model will be, layer by layer (which KV groups, how many channels,
which experts, which bundle a dropped layer goes to). The cost model, `diff`
and the executor all read this, never the statements, so two plans that
mean the same model resolve to equal `ResolvedPlan`s.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler import ir
from compiler.facts import ModelFacts


@dataclass(frozen=True)
class Channels:
    """A kept channel count and the metric that picks which channels."""

    width: int
    metric: str = "magnitude"


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one original decoder layer."""

    index: int
    moe: bool
    dropped: bool = False
    bundle: str | None = None
    groups_kept: tuple[int, ...] = ()  # KV groups kept (all of them when untouched)
    attn_compensate: bool = False
    attn_reconstruct: bool = False  # o_proj's kept columns come re-solved from the sidecar
    ffn: Channels | None = None  # dense MLP width kept (None: not an MLP layer)
    ffn_compensate: bool = False
    ffn_reconstruct: bool = False  # down_proj's kept columns likewise
    experts_kept: tuple[int, ...] = ()
    experts_rescale: bool = False  # kept experts' down projections scaled (`rescale`)
    expert_ffn: Channels | None = None
    shared_ffn: Channels | None = None

    def heads_kept(self, facts: ModelFacts) -> int:
        return len(self.groups_kept) * (facts.group_size or 1)

    def shape_key(self, facts: ModelFacts) -> tuple[object, ...]:
        """Everything that decides this layer's tensor shapes (for uniformity)."""
        return (
            self.moe,
            len(self.groups_kept),
            self.ffn.width if self.ffn else None,
            len(self.experts_kept),
            self.expert_ffn.width if self.expert_ffn else None,
            self.shared_ffn.width if self.shared_ffn else None,
        )


@dataclass(frozen=True)
class ResolvedPlan:
    facts: ModelFacts
    layers: tuple[LayerPlan, ...]
    bundles: tuple[tuple[str, tuple[int, ...]], ...]  # (name, original layers), by name

    @property
    def kept(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if not layer.dropped)

    @property
    def dropped(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.dropped)

    @property
    def uniform(self) -> bool:
        """Every kept layer has the same shapes (one config describes them all).

        MoE models with dense layers compare MoE and dense layers separately,
        as their config does.
        """
        keys = {}
        for layer in self.kept:
            keys.setdefault(layer.moe, set()).add(layer.shape_key(self.facts))
        return all(len(v) == 1 for v in keys.values())

    @property
    def reconstructs(self) -> bool:
        return any(layer.attn_reconstruct or layer.ffn_reconstruct for layer in self.kept)

    @property
    def compensates(self) -> bool:
        return any(layer.attn_compensate or layer.ffn_compensate for layer in self.kept)

    @property
    def layers_map(self) -> tuple[int, ...]:
        """New layer index → original layer index."""
        return tuple(layer.index for layer in self.kept)


def default_bundles(dropped: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """No `bundle` statement: first half (rounding up) to B, the rest to C."""
    if not dropped:
        return []
    half = (len(dropped) + 1) // 2
    out = [("B", tuple(dropped[:half]))]
    if dropped[half:]:
        out.append(("C", tuple(dropped[half:])))
    return out


def _channels(width: ir.Width, original: int | None) -> Channels:
    """A width equal to the original keeps every channel: the metric is moot."""
    return Channels(width.n, "magnitude" if width.n == original else width.metric)


def resolve(plan: ir.Plan, facts: ModelFacts) -> ResolvedPlan:
    """Resolve a plan the checker accepted (no errors) into per-layer decisions."""
    assert facts.layers is not None
    n = facts.layers
    kv = facts.kv_heads or 0
    layer: dict[int, dict[str, object]] = {i: {} for i in range(n)}
    named_bundles: dict[str, tuple[int, ...]] = {}
    for st in plan.statements:
        idx = st.layers.within(n)
        # What the statement decides is computed once and shared by its layers,
        # so resolving costs O(statement size + layers), not their product.
        decided: dict[str, object] = {}
        match st:
            case ir.DropLayers():
                decided = {"dropped": True}
            case ir.AttnDropGroups(groups=groups, compensate=comp, reconstruct=rec):
                gone = set(groups.within(kv))
                kept = tuple(g for g in range(kv) if g not in gone)
                decided = {"groups_kept": kept, "attn_compensate": comp, "attn_reconstruct": rec}
            case ir.MlpWidth(width=w, compensate=comp, reconstruct=rec):
                decided = {
                    "ffn": _channels(w, facts.ffn),
                    "ffn_compensate": comp,
                    "ffn_reconstruct": rec,
                }
            case ir.MoeDropExperts(experts=experts, rescale=rescale):
                gone = set(experts.within(facts.experts or 0))
                kept = tuple(e for e in range(facts.experts or 0) if e not in gone)
                decided = {"experts_kept": kept, "experts_rescale": rescale}
            case ir.MoeExpertsWidth(width=w):
                decided = {"expert_ffn": _channels(w, facts.expert_ffn)}
            case ir.MoeSharedWidth(width=w):
                decided = {"shared_ffn": _channels(w, facts.shared_ffn)}
        if decided:
            for i in idx:
                layer[i].update(decided)
        if isinstance(st, ir.Bundle):
            named_bundles[st.name] = tuple(sorted(set(idx)))

    dropped = [i for i in range(n) if layer[i].get("dropped")]
    bundles = sorted(named_bundles.items()) if named_bundles else default_bundles(dropped)
    bundle_of = {i: name for name, members in bundles for i in members}

    all_groups = tuple(range(kv))
    all_experts = tuple(range(facts.experts or 0))
    plans = []
    for i in range(n):
        rec = layer[i]
        moe = facts.is_moe_layer(i)
        plans.append(
            LayerPlan(
                index=i,
                moe=moe,
                dropped=bool(rec.get("dropped")),
                bundle=bundle_of.get(i),
                groups_kept=rec.get("groups_kept", all_groups),  # type: ignore[arg-type]
                attn_compensate=bool(rec.get("attn_compensate")),
                attn_reconstruct=bool(rec.get("attn_reconstruct")),
                ffn=None if moe else rec.get("ffn", Channels(facts.ffn or 0)),  # type: ignore[arg-type]
                ffn_compensate=bool(rec.get("ffn_compensate")),
                ffn_reconstruct=bool(rec.get("ffn_reconstruct")),
                experts_kept=rec.get("experts_kept", all_experts)  # type: ignore[arg-type]
                if moe
                else (),
                experts_rescale=bool(rec.get("experts_rescale")) and moe,
                expert_ffn=rec.get("expert_ffn", Channels(facts.expert_ffn or 0))  # type: ignore[arg-type]
                if moe
                else None,
                shared_ffn=rec.get("shared_ffn", Channels(facts.shared_ffn or 0))  # type: ignore[arg-type]
                if moe
                else None,
            )
        )
    return ResolvedPlan(facts, tuple(plans), tuple(bundles))
