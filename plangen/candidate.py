"""A candidate plan as data: what it removes, what it costs, which channels it keeps.

Strategies produce `Candidate`s; the pipeline measures each one on held-out
calibration windows (`plangen.heldout`) and emits the chosen one as a plan
(`plangen.emit`). Parameters are counted by the compiler's cost model from the
`LayerPlan`s the candidate resolves to, so the figure a strategy aims at is
the figure `plancc check` reports. Which channels a width decision keeps is
decided here exactly as the executor decides it (`compiler.geometry.top_channels`
on the sidecar table the plan names), so what is measured is what is applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from compiler import cost
from compiler.facts import ModelFacts
from compiler.geometry import LayerSelection, space_indices, top_channels
from compiler.resolve import Channels, LayerPlan, ResolvedPlan
from compiler.sidecar import table_name
from plangen.scores import ScoreTables, geometry


@dataclass(frozen=True)
class Candidate:
    """One way to prune the model, in original layer numbers."""

    strategy: str  # depth | uniform | unbalanced | global | flap
    label: str  # one line for the end screen and the plan's comment
    drop: tuple[int, ...] = ()
    groups_dropped: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mlp_width: Mapping[int, int] = field(default_factory=dict)  # only narrowed layers
    metric: str = "magnitude"  # the table that picks channels (`by METRIC`) and groups
    compensate: bool = False
    reconstruct: bool = False  # narrowed output projections re-solved (`plangen.reconstruct`)
    notes: Mapping[str, str] = field(default_factory=dict)  # statement key -> comment
    bundles: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    keep: tuple[int, ...] = ()
    # MoE layers: the routed experts removed (original indices), and whether the kept
    # ones are rescaled for the router probability the dropped ones took (`rescale`).
    experts_dropped: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    experts_rescale: bool = False
    # MoE layers: every routed expert's / the shared expert's kept channels (`metric`).
    expert_width: int | None = None
    shared_width: int | None = None
    moe_layers: tuple[int, ...] = ()  # where the widths apply: every MoE layer
    # The table that picks channels and KV groups when it is not `metric`: a MoE
    # candidate drops experts by a router score (`metric`) and narrows experts, the
    # shared expert and dense MLPs and drops KV groups by a channel score.
    width_metric: str | None = None

    @property
    def unit_metric(self) -> str:
        """The table every width (`by METRIC`) and KV-group choice is made by."""
        return self.width_metric or self.metric

    def resolved(self, facts: ModelFacts) -> ResolvedPlan:
        base = cost.original(facts)
        drop = set(self.drop)
        layers = []
        for lp in base.layers:
            i = lp.index
            if i in drop:
                layers.append(LayerPlan(index=i, moe=lp.moe, dropped=True))
                continue
            gone = set(self.groups_dropped.get(i, ()))
            width = self.mlp_width.get(i)
            experts_gone = set(self.experts_dropped.get(i, ()))
            layers.append(
                dataclasses.replace(
                    lp,
                    groups_kept=tuple(g for g in lp.groups_kept if g not in gone),
                    attn_compensate=self.compensate and bool(gone),
                    attn_reconstruct=self.reconstruct and bool(gone),
                    ffn=Channels(width, self.unit_metric) if width is not None else lp.ffn,
                    ffn_compensate=self.compensate and width is not None,
                    ffn_reconstruct=self.reconstruct and width is not None,
                    experts_kept=tuple(e for e in lp.experts_kept if e not in experts_gone),
                    experts_rescale=self.experts_rescale and bool(experts_gone),
                    expert_ffn=Channels(self.expert_width, self.unit_metric)
                    if i in self.moe_layers and self.expert_width is not None
                    else lp.expert_ffn,
                    shared_ffn=Channels(self.shared_width, self.unit_metric)
                    if i in self.moe_layers and self.shared_width is not None
                    else lp.shared_ffn,
                )
            )
        return dataclasses.replace(base, layers=tuple(layers))

    def params(self, facts: ModelFacts) -> int:
        return cost.cost(self.resolved(facts)).params

    def kept_channels(self, scores: ScoreTables, layer: int) -> tuple[int, ...]:
        """The channels apply keeps in a narrowed layer (ties to the lower index)."""
        table = scores.tables.get(table_name(self.unit_metric, layer, "mlp"))
        if table is None:  # the error names the metrics that were measured
            table = scores.width(self.unit_metric, layer).channels
        return top_channels(np.asarray(table), self.mlp_width[layer])

    def kept_inputs(
        self, layer: int, space: str, facts: ModelFacts, scores: ScoreTables
    ) -> np.ndarray | None:
        """The kept input columns of the layer's `q` (o_proj) or `ffn` (down_proj) space,
        in increasing order, or None when the candidate leaves that part whole (a
        dropped layer included: its columns all go)."""
        geom = geometry(facts)
        if space == "q" and self.groups_dropped.get(layer):
            kept = [g for g in range(geom.kv_heads) if g not in self.groups_dropped[layer]]
            return np.asarray(space_indices("q", LayerSelection(groups=tuple(kept)), geom))
        if space == "ffn" and layer in self.mlp_width:
            return np.asarray(self.kept_channels(scores, layer), dtype=np.int64)
        return None


def original_params(facts: ModelFacts) -> int:
    return cost.cost(cost.original(facts)).params


def lowest_groups(scores: np.ndarray, n: int) -> tuple[int, ...]:
    """The n lowest-scoring KV groups (ties to the higher index, mirroring `top_channels`)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return tuple(sorted(int(g) for g in order[len(order) - n :])) if n else ()
