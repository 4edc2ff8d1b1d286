"""Semantic difference of two plans (`plancc diff OLD NEW`).

Both plans are resolved first, so the difference is between the models they
describe, not their texts: reordered statements, merged ranges, `by
magnitude` spelled out or a width equal to the original all compare equal.
Like `terraform plan`, every changed decision is one line keyed by its layer,
old → new, followed by the cost delta and a summary line. A plan with errors is
compared as `compiler.check.resolve_anyway` resolves it; `plancc diff` lists its
errors after the difference.
"""

from __future__ import annotations

from compiler.cost import cost
from compiler.ir import Selection
from compiler.report import render_cost_table
from compiler.resolve import Channels, LayerPlan, ResolvedPlan


def _sel(values: tuple[int, ...]) -> str:
    return str(Selection.from_ints(list(values))) if values else "none"


def _ch(c: Channels | None) -> str:
    if c is None:
        return "-"
    return f"{c.width}" + ("" if c.metric == "magnitude" else f" by {c.metric}")


def layer_changes(old: LayerPlan, new: LayerPlan) -> list[str]:
    """The decisions that differ for one layer, one phrase each."""
    if old.dropped != new.dropped:
        if new.dropped:
            return [f"kept → dropped (bundle {new.bundle})"]
        return [f"dropped (bundle {old.bundle}) → kept"]
    if old.dropped:
        return [f"bundle {old.bundle} → {new.bundle}"] if old.bundle != new.bundle else []
    out = []
    if old.groups_kept != new.groups_kept:
        out.append(f"kv groups kept {_sel(old.groups_kept)} → {_sel(new.groups_kept)}")
    if old.attn_compensate != new.attn_compensate:
        out.append(f"attn compensate {old.attn_compensate} → {new.attn_compensate}")
    if old.attn_reconstruct != new.attn_reconstruct:
        out.append(f"attn reconstruct {old.attn_reconstruct} → {new.attn_reconstruct}")
    if old.ffn != new.ffn:
        out.append(f"mlp width {_ch(old.ffn)} → {_ch(new.ffn)}")
    if old.ffn_compensate != new.ffn_compensate:
        out.append(f"mlp compensate {old.ffn_compensate} → {new.ffn_compensate}")
    if old.ffn_reconstruct != new.ffn_reconstruct:
        out.append(f"mlp reconstruct {old.ffn_reconstruct} → {new.ffn_reconstruct}")
    if old.experts_kept != new.experts_kept:
        out.append(f"experts kept {_sel(old.experts_kept)} → {_sel(new.experts_kept)}")
    if old.experts_rescale != new.experts_rescale:
        out.append(f"experts rescale {old.experts_rescale} → {new.experts_rescale}")
    if old.expert_ffn != new.expert_ffn:
        out.append(f"expert width {_ch(old.expert_ffn)} → {_ch(new.expert_ffn)}")
    if old.shared_ffn != new.shared_ffn:
        out.append(f"shared width {_ch(old.shared_ffn)} → {_ch(new.shared_ffn)}")
    return out


def diff_plans(old: ResolvedPlan, new: ResolvedPlan) -> tuple[bool, str]:
    """(whether they differ, the report text)."""
    lines = []
    if old.facts != new.facts:
        changed = sorted(
            k
            for k in set(old.facts.as_dict()) | set(new.facts.as_dict())
            if old.facts.as_dict().get(k) != new.facts.as_dict().get(k)
        )
        lines.append("model facts differ: " + ", ".join(changed) + " (plans for different models)")
    changed_layers = 0
    for a, b in zip(old.layers, new.layers, strict=False):
        changes = layer_changes(a, b)
        if changes:
            changed_layers += 1
            lines.append(f"layer {a.index}: " + "; ".join(changes))
    if len(old.layers) != len(new.layers):
        lines.append(f"layer count {len(old.layers)} → {len(new.layers)}")
    if not lines:
        return False, "no difference"
    lines.append("")
    if old.facts.arch is None or new.facts.arch is None:  # only in a plan with errors
        lines.append("(no cost delta: a plan does not name a supported architecture)")
    else:
        lines += render_cost_table(cost(old), cost(new), labels=("old", "new"))
    lines.append("")
    lines.append(f"{changed_layers} layer{'s' * (changed_layers != 1)} changed")
    return True, "\n".join(lines)
