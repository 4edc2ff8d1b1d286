"""The cost report `plancc check` prints: before → after, per layer, loadability,
and per serving target whether the result runs there (`compiler.targets`)."""

from __future__ import annotations

from compiler.cost import Cost, Loadability, cost, original
from compiler.resolve import LayerPlan, ResolvedPlan
from compiler.targets import Verdict, loadability, verdicts

CONVENTIONS = (
    "FLOPs/token = 2 x matmul weights one token passes through (attention scores excluded); "
    "KV cache in 16-bit"
)


def pct(before: int, after: int) -> str:
    if before == 0:
        return "n/a"
    return f"{(after - before) / before * 100:+.1f}%"


def cost_rows(before: Cost, after: Cost) -> list[tuple[str, int, int]]:
    return [
        ("parameters", before.params, after.params),
        ("FLOPs/token", before.flops_per_token, after.flops_per_token),
        ("KV cache bytes/token", before.kv_bytes_per_token, after.kv_bytes_per_token),
        ("layers", before.layers, after.layers),
    ]


def render_cost_table(
    before: Cost, after: Cost, labels: tuple[str, str] = ("before", "after")
) -> list[str]:
    lines = [f"{'':<22}{labels[0]:>16}{labels[1]:>16}{'change':>10}"]
    for name, b, a in cost_rows(before, after):
        lines.append(f"{name:<22}{b:>16,}{a:>16,}{pct(b, a):>10}")
    return lines


def _frac(kept: int, total: int | None) -> str:
    return f"{kept}/{total}" if total is not None else str(kept)


def layer_row(layer: LayerPlan, new_index: int | None, resolved: ResolvedPlan) -> str:
    f = resolved.facts
    if layer.dropped:
        return f"{layer.index:>5}  {'-':>4}  dropped → bundle {layer.bundle}"
    cells = [
        f"{layer.index:>5}",
        f"{new_index:>4}",
        f"{_frac(layer.heads_kept(f), f.heads):>7}",
        f"{_frac(len(layer.groups_kept), f.kv_heads):>7}",
    ]
    if layer.moe:
        cells.append(f"{'moe':>11}")
        cells.append(f"{_frac(len(layer.experts_kept), f.experts):>9}")
        cells.append(
            f"{_frac(layer.expert_ffn.width if layer.expert_ffn else 0, f.expert_ffn):>11}"
        )
        cells.append(
            f"{_frac(layer.shared_ffn.width if layer.shared_ffn else 0, f.shared_ffn):>11}"
        )
    else:
        cells.append(f"{_frac(layer.ffn.width if layer.ffn else 0, f.ffn):>11}")
        if f.is_moe:
            cells += [f"{'dense':>9}", f"{'':>11}", f"{'':>11}"]
    notes = []
    if layer.ffn and layer.ffn.width != f.ffn:
        notes.append(f"mlp by {layer.ffn.metric}")
    if layer.attn_compensate or layer.ffn_compensate:
        notes.append("compensated")
    if layer.attn_reconstruct or layer.ffn_reconstruct:
        notes.append("reconstructed")
    if layer.experts_rescale:
        notes.append("experts rescaled")
    if notes:
        cells.append("  " + ", ".join(notes))
    return "  ".join(cells).rstrip()


def render_layer_table(resolved: ResolvedPlan) -> list[str]:
    f = resolved.facts
    head = f"{'layer':>5}  {'new':>4}  {'heads':>7}  {'kv':>7}  {'ffn':>11}"
    if f.is_moe:
        head += f"  {'experts':>9}  {'expert_ffn':>11}  {'shared_ffn':>11}"
    lines = [head]
    new = 0
    for layer in resolved.layers:
        lines.append(layer_row(layer, None if layer.dropped else new, resolved))
        new += not layer.dropped
    return lines


def render_report(resolved: ResolvedPlan) -> str:
    before, after = cost(original(resolved.facts)), cost(resolved)
    load = loadability(resolved)
    out = [f"cost of {resolved.facts.name} ({CONVENTIONS})"]
    out += render_cost_table(before, after)
    if not after.embedding_params_known:
        out.append("  (model block has no `vocab`: embeddings and LM head not counted)")
    out.append("")
    out += render_layer_table(resolved)
    if resolved.bundles:
        out.append("")
        for name, members in resolved.bundles:
            out.append(f"bundle {name}: {len(members)} layers ({_sel(members)})")
    out.append("")
    if load.stock:
        out.append(f"result: {load.reason}")
    else:
        out.append("result: loads with executor.load (stock transformers cannot: see `stock`)")
    out.append("targets (plancc check --target NAME):")
    out += [target_line(v) for v in verdicts(resolved).values()]
    return "\n".join(out)


def target_line(v: Verdict) -> str:
    """`  vllm      runs: as ...` or `  vllm      does not run [P146]: width 1000 ...`."""
    if v.runs:
        return f"  {v.target:<9} runs: {v.reason}"
    return f"  {v.target:<9} does not run [{v.codes[0]}]: {v.reason}"


def target_json(v: Verdict) -> dict[str, object]:
    return {
        "runs": v.runs,
        "reason": v.reason,
        "format": v.format,
        "arch": v.arch,
        "codes": sorted(set(v.codes)),
    }


def report_json(resolved: ResolvedPlan) -> dict[str, object]:
    before, after = cost(original(resolved.facts)), cost(resolved)
    load: Loadability = loadability(resolved)
    return {
        "before": before.__dict__,
        "after": after.__dict__,
        "uniform": resolved.uniform,
        "stock_loadable": load.stock,
        "loadability": load.reason,
        "targets": {name: target_json(v) for name, v in verdicts(resolved).items()},
        "layers_map": list(resolved.layers_map),
        "bundles": {name: list(m) for name, m in resolved.bundles},
    }


def _sel(members: tuple[int, ...]) -> str:
    from compiler.ir import Selection

    return str(Selection.from_ints(list(members)))
