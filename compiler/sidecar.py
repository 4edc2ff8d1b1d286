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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from compiler import ir
from compiler.facts import ModelFacts


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
            case ir.MlpWidth(width=w, compensate=comp):
                if w.metric != "magnitude" and facts.ffn:
                    out += [
                        NeededTable(
                            table_name(w.metric, i, "mlp"),
                            (facts.ffn,),
                            w.metric_span,
                            f"by {w.metric}",
                        )
                        for i in layers
                    ]
                if comp and facts.ffn:
                    out += [
                        NeededTable(
                            table_name("mean_in", i, "mlp"),
                            (facts.ffn,),
                            st.compensate_span,
                            "compensate",
                        )
                        for i in layers
                    ]
            case ir.AttnDropGroups(compensate=True) if facts.heads and facts.head_dim:
                q = facts.heads * facts.head_dim
                out += [
                    NeededTable(
                        table_name("mean_in", i, "attn"), (q,), st.compensate_span, "compensate"
                    )
                    for i in layers
                ]
            case ir.MoeExpertsWidth(width=w) if w.metric != "magnitude":
                if facts.experts and facts.expert_ffn:
                    shape = (facts.experts, facts.expert_ffn)
                    out += [
                        NeededTable(
                            table_name(w.metric, i, "experts_ffn"),
                            shape,
                            w.metric_span,
                            f"by {w.metric}",
                        )
                        for i in layers
                    ]
            case ir.MoeSharedWidth(width=w) if w.metric != "magnitude":
                if facts.shared_ffn:
                    out += [
                        NeededTable(
                            table_name(w.metric, i, "shared"),
                            (facts.shared_ffn,),
                            w.metric_span,
                            f"by {w.metric}",
                        )
                        for i in layers
                    ]
    return out


def read_sidecar_tables(path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The file's sha256 and its table shapes, read from the safetensors header only."""
    from compiler.checkpoint import CheckpointError, read_safetensors_header

    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        header = read_safetensors_header(path)
    except FileNotFoundError:
        raise SidecarError(f"scores sidecar {path} does not exist") from None
    except (OSError, CheckpointError) as exc:
        raise SidecarError(f"scores sidecar {path} cannot be read: {exc}") from None
    shapes = {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}
    return digest.hexdigest(), shapes
