"""Expert selection and slicing of mixture-of-experts layers, beside `slicing`.

A MoE layer has three axes a plan can cut, each a space of the architecture
table: `experts` (the router's rows; every per-expert tensor belongs to one
expert), `expert_ffn` (the channels of one routed expert) and `shared_ffn`
(the channels of the shared expert). What is kept is recorded as selections
of the task list, under keys that never couple two experts:

    L.experts          the kept routed experts (original indices), router rows
    L.expert_ffn.E     the kept channels of routed expert E (original index)
    L.shared_ffn       the kept channels of the shared expert

A kept expert is renumbered to its position among the kept ones (expert 5 of
kept (0, 2, 5) becomes expert 2), so the written model is an ordinary
checkpoint with fewer experts; a dropped expert's tensors go whole to the
width bundle. Channels are chosen per expert, by magnitude or by a sidecar
table (`metric.L.experts_ffn`, one row per expert; `metric.L.shared`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from compiler.architectures import TensorSpec
from compiler.facts import ModelFacts
from compiler.geometry import top_channels
from compiler.resolve import Channels, LayerPlan

EXPERTS = "experts"
EXPERT_FFN = "expert_ffn"
EXPERT_GATE_UP = "expert_gate_up"  # the fused form's gate and up rows, 2 x expert_ffn
SHARED_FFN = "shared_ffn"


@dataclass(frozen=True)
class ExpertSelection:
    """What one MoE layer keeps; None means everything along that axis."""

    experts: tuple[int, ...] | None = None
    expert_ffn: Mapping[int, tuple[int, ...]] | None = None  # kept expert -> kept channels
    shared_ffn: tuple[int, ...] | None = None

    def keeps(self, expert: int) -> bool:
        return self.experts is None or expert in self.experts

    def new_index(self, expert: int) -> int:
        """The kept expert's number in the written model."""
        return expert if self.experts is None else self.experts.index(expert)

    def selections(self, layer: int) -> dict[str, np.ndarray]:
        """The task list's selections for this layer (keys in the module docstring)."""
        out: dict[str, np.ndarray] = {}
        if self.experts is not None:
            out[f"{layer}.{EXPERTS}"] = np.asarray(self.experts, dtype=np.int64)
        for e, kept in (self.expert_ffn or {}).items():
            out[f"{layer}.{EXPERT_FFN}.{e}"] = np.asarray(kept, dtype=np.int64)
        if self.shared_ffn is not None:
            out[f"{layer}.{SHARED_FFN}"] = np.asarray(self.shared_ffn, dtype=np.int64)
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "experts": list(self.experts) if self.experts is not None else None,
            "expert_ffn": (
                {str(e): list(c) for e, c in self.expert_ffn.items()}
                if self.expert_ffn is not None
                else None
            ),
            "shared_ffn": list(self.shared_ffn) if self.shared_ffn is not None else None,
        }


def selection_key(layer: int, space: str, expert: int | None) -> str:
    """The selection key of one axis of a tensor (`expert`: its routed expert, if any)."""
    if space == EXPERT_FFN and expert is not None:
        return f"{layer}.{EXPERT_FFN}.{expert}"
    return f"{layer}.{space}"


def _pattern(spec: TensorSpec) -> re.Pattern[str]:
    return re.compile(re.escape(spec.name).replace(re.escape("{e}"), r"(\d+)"))


def expert_of(spec: TensorSpec, rel: str) -> int | None:
    """The routed expert a layer-relative tensor name belongs to (None: not per expert)."""
    if not spec.per_expert:
        return None
    m = _pattern(spec).fullmatch(rel)
    return int(m.group(1)) if m else None


def renumbered(spec: TensorSpec, expert: int) -> str:
    """The layer-relative name of a per-expert tensor as expert number `expert`."""
    return spec.name.replace("{e}", str(expert))


def choose(
    layer: LayerPlan,
    experts: int,
    expert_ffn: int,
    shared_ffn: int,
    table: Callable[[str, tuple[int, ...]], np.ndarray],
    magnitude: Callable[[str, int | None], np.ndarray],
) -> ExpertSelection:
    """What a MoE layer keeps. `table(name, shape)` reads a sidecar table; `magnitude(space,
    expert)` is the channels' magnitude of one expert (`expert_ffn`) or of the shared one."""
    from compiler.sidecar import table_name

    kept = tuple(layer.experts_kept)
    sel_experts = None if len(kept) == experts else kept
    per_expert = None
    if layer.expert_ffn is not None and expert_ffn and layer.expert_ffn.width != expert_ffn:
        scores = _expert_scores(layer, layer.expert_ffn, experts, expert_ffn, table, magnitude)
        per_expert = {e: top_channels(scores[e], layer.expert_ffn.width) for e in kept}
    shared = None
    if layer.shared_ffn is not None and shared_ffn and layer.shared_ffn.width != shared_ffn:
        w = layer.shared_ffn
        if w.metric == "magnitude":
            s = magnitude(SHARED_FFN, None)
        else:
            s = table(table_name(w.metric, layer.index, "shared"), (shared_ffn,))
        shared = top_channels(s, w.width)
    return ExpertSelection(sel_experts, per_expert, shared)


def _expert_scores(
    layer: LayerPlan,
    width: Channels,
    experts: int,
    expert_ffn: int,
    table: Callable[[str, tuple[int, ...]], np.ndarray],
    magnitude: Callable[[str, int | None], np.ndarray],
) -> np.ndarray:
    """(experts, expert_ffn) channel scores: a sidecar table, or magnitudes of kept experts."""
    from compiler.sidecar import table_name

    if width.metric != "magnitude":
        return table(table_name(width.metric, layer.index, "experts_ffn"), (experts, expert_ffn))
    scores = np.zeros((experts, expert_ffn), dtype=np.float64)
    for e in layer.experts_kept:
        scores[e] = magnitude(EXPERT_FFN, e)
    return scores


def moe_widths(layer: LayerPlan, facts: ModelFacts) -> dict[str, int | None]:
    """The MoE widths of a kept layer as `executor.configs.LayerShape` takes them."""
    return {
        "experts": len(layer.experts_kept),
        "expert_ffn": layer.expert_ffn.width if layer.expert_ffn else facts.expert_ffn,
        "shared_ffn": (layer.shared_ffn.width if layer.shared_ffn else facts.shared_ffn) or None,
    }
