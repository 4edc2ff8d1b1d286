"""The scores sidecar: names and shapes of its importance tables.

A plan never lists channel indices; `by METRIC` names a table in a
safetensors sidecar pinned by sha256. This module is the one place that says
what those tables are called and what shape each must have, for the checker
(here), for `plangen analyze` (which writes them) and for the executor (which
reads them to pick channels).

Tables (`L` is the original layer index):
  METRIC.L.mlp          (ffn,)              dense MLP channel scores
  METRIC.L.experts_ffn  (experts, expert_ffn) routed-expert channel scores
  METRIC.L.shared       (shared_ffn,)       shared-expert channel scores
  mean_in.L.mlp         (ffn,)              mean input of down_proj (`mlp ... compensate`)
  mean_in.L.attn        (heads*head_dim,)   mean input of o_proj   (`attn ... compensate`)
  reconstruct.L.mlp     (hidden, width)     re-solved kept columns of down_proj (`reconstruct`)
  reconstruct.L.attn    (hidden, kept q)    re-solved kept columns of o_proj    (`reconstruct`)

Reconstructed weights are solved layer by layer on the model pruned so far, so
they hold only for the plan they were solved for: the metadata (JSON under the
`plancc` key) records that plan's decision for every layer (`layer_decisions`)
under `reconstruction.for`, and the checker compares it with the plan it reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler import ir
from compiler.checkpoint import CheckpointError, read_safetensors_header
from compiler.facts import ModelFacts
from compiler.hashing import sha256_file

# The metadata key holding `compiler.checkpoint.weights_digest` of the model the
# tables were measured (and reconstructed weights solved) on.
WEIGHTS_KEY = "model_weights"


# What to do about a damaged sidecar (not a checkpoint: nothing to re-download).
SIDECAR_FIX = "write it again with `plangen analyze` (or restore it from where it was copied)"


class SidecarError(Exception):
    """The sidecar cannot be read; the message names the file and the problem."""


def table_name(metric: str, layer: int, part: str) -> str:
    return f"{metric}.{layer}.{part}"


@dataclass(frozen=True)
class NeededTable:
    table: str
    shape: tuple[int, ...]
    span: ir.Span
    reason: str


def required_tables(plan: ir.Plan, facts: ModelFacts) -> list[NeededTable]:
    """Every sidecar table the plan's statements need, in source order."""
    n = facts.layers or 0
    out: list[NeededTable] = []
    for st in plan.statements:
        layers = st.layers.within(n)
        match st:
            case ir.MlpWidth():
                out += _mlp_tables(st, layers, facts)
            case ir.AttnDropGroups() if facts.heads and facts.head_dim:
                out += _attn_tables(st, layers, facts)
            case ir.MoeDropExperts(rescale=True) if facts.experts:
                out += _each_layer(
                    "router_prob", "experts", (facts.experts,), st.rescale_span, "rescale", layers
                )
            case ir.MoeExpertsWidth(width=w) if w.metric != "magnitude":
                if facts.experts and facts.expert_ffn:
                    shape = (facts.experts, facts.expert_ffn)
                    out += _each_layer(
                        w.metric, "experts_ffn", shape, w.metric_span, f"by {w.metric}", layers
                    )
            case ir.MoeSharedWidth(width=w) if w.metric != "magnitude":
                if facts.shared_ffn:
                    shape = (facts.shared_ffn,)
                    out += _each_layer(
                        w.metric, "shared", shape, w.metric_span, f"by {w.metric}", layers
                    )
    return out


def _each_layer(
    metric: str,
    part: str,
    shape: tuple[int, ...],
    span: ir.Span,
    reason: str,
    layers: Iterable[int],
) -> list[NeededTable]:
    """One statement's clause needs the same table in every layer it names."""
    return [NeededTable(table_name(metric, i, part), shape, span, reason) for i in layers]


def _mlp_tables(st: ir.MlpWidth, layers: Sequence[int], facts: ModelFacts) -> list[NeededTable]:
    """`mlp ... width N by METRIC [compensate] [reconstruct]`: scores to rank the
    channels, down_proj's mean input to compensate, its re-solved kept columns."""
    out: list[NeededTable] = []
    w = st.width
    if w.metric != "magnitude" and facts.ffn:
        out += _each_layer(w.metric, "mlp", (facts.ffn,), w.metric_span, f"by {w.metric}", layers)
    if st.compensate and facts.ffn:
        out += _each_layer("mean_in", "mlp", (facts.ffn,), st.compensate_span, "compensate", layers)
    if st.reconstruct and facts.hidden:
        shape = (facts.hidden, w.n)
        out += _each_layer("reconstruct", "mlp", shape, st.reconstruct_span, "reconstruct", layers)
    return out


def _attn_tables(
    st: ir.AttnDropGroups, layers: Sequence[int], facts: ModelFacts
) -> list[NeededTable]:
    """`attn ... drop groups [compensate] [reconstruct]`: o_proj's mean input and its
    re-solved kept columns, which are as wide as the query heads the kept groups keep."""
    out: list[NeededTable] = []
    q = facts.heads * facts.head_dim  # the caller checked both are known
    if st.compensate:
        out += _each_layer("mean_in", "attn", (q,), st.compensate_span, "compensate", layers)
    if st.reconstruct and facts.hidden and facts.kv_heads:
        gone = len(set(st.groups.within(facts.kv_heads)))
        kept_q = (facts.kv_heads - gone) * (facts.group_size or 1) * facts.head_dim
        shape = (facts.hidden, kept_q)
        out += _each_layer("reconstruct", "attn", shape, st.reconstruct_span, "reconstruct", layers)
    return out


def layer_decisions(plan: ir.Plan, facts: ModelFacts) -> dict[str, dict[str, Any]]:
    """What the plan does to every layer that it touches, as plain JSON data:
    {"L": {"dropped": true} | {"attn": {...}, "mlp": {...}}}. Reconstruction
    records it for the plan it was solved for; the checker compares."""
    n = facts.layers or 0
    out: dict[str, dict[str, Any]] = {}
    for st in plan.statements:
        match st:
            case ir.DropLayers():
                entry: dict[str, Any] = {"dropped": True}
            case ir.AttnDropGroups(groups=g, compensate=comp, reconstruct=rec):
                dropped = sorted(set(g.within(facts.kv_heads or 0)))
                entry = {"attn": {"drop_groups": dropped, "compensate": comp, "reconstruct": rec}}
            case ir.MlpWidth(width=w, compensate=comp, reconstruct=rec):
                entry = {
                    "mlp": {"width": w.n, "by": w.metric, "compensate": comp, "reconstruct": rec}
                }
            case _:
                continue
        for i in st.layers.within(n):
            out.setdefault(str(i), {}).update(entry)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def describe_decision(entry: dict[str, Any] | None) -> str:
    """One layer's decision in words, for a diagnostic."""
    if not entry:
        return "left whole"
    if entry.get("dropped"):
        return "dropped"
    parts = []
    if "attn" in entry:
        a = entry["attn"]
        parts.append(f"groups {','.join(map(str, a['drop_groups']))} dropped")
    if "mlp" in entry:
        m = entry["mlp"]
        parts.append(f"mlp width {m['width']} by {m['by']}")
    for part in ("attn", "mlp"):
        for flag in ("compensate", "reconstruct"):
            if entry.get(part, {}).get(flag):
                parts.append(f"{part} {flag}")
    return ", ".join(parts)


@dataclass(frozen=True)
class SidecarHeader:
    """What the checker reads of a sidecar: its sha256, table shapes and metadata."""

    sha256: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)  # the `plancc` JSON, parsed

    def weights(self) -> str | None:
        """The weights digest the tables were measured on (`weights_digest`), if recorded."""
        value = self.metadata.get(WEIGHTS_KEY)
        return value if isinstance(value, str) else None

    def reconstructed_for(self) -> dict[str, dict[str, Any]] | None:
        rec = self.metadata.get("reconstruction")
        return rec.get("for") if isinstance(rec, dict) else None


def read_sidecar_tables(path: Path) -> SidecarHeader:
    """The file's sha256, table shapes and metadata, read from the safetensors header only."""
    try:
        digest = sha256_file(path)
        header = read_safetensors_header(path, SIDECAR_FIX)
    except FileNotFoundError:
        raise SidecarError(f"scores sidecar {path} does not exist") from None
    except (OSError, CheckpointError) as exc:
        raise SidecarError(f"scores sidecar {path} cannot be read: {exc}") from None
    shapes = {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}
    raw = (header.get("__metadata__") or {}).get("plancc")
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise SidecarError(f"scores sidecar {path}: its `plancc` metadata is not JSON") from None
    return SidecarHeader(digest, shapes, metadata if isinstance(metadata, dict) else {})
