"""A chosen `Candidate` as plan text, canonical (`compiler.fmt`) and commented.

The plan opens with its provenance (the command line, the plancc version, the
model's fingerprint, the calibration text's sha256), then the header every
plan has, and one statement per decision with the numbers that decided it as
a comment: the depth score of the dropped layers, each pruned layer's KV
group scores, the fraction of channels kept. What is emitted is formatted by
the compiler's printer and must pass the checker before it is written.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from compiler.fmt import format_source, quote
from compiler.ir import Selection
from compiler.sidecar import table_name
from plangen.candidate import Candidate
from plangen.scores import ScoreTables


@dataclass(frozen=True)
class Header:
    model_block: str  # `model "..." { ... }` as `plangen header` prints it
    source: str
    scores_file: str
    scores_sha256: str
    calibration: str  # e.g. `builtin samples 32 seqlen 512 seed 0`
    provenance: Sequence[str]  # comment lines, without "# "


def _scores_comment(values: Sequence[float]) -> str:
    return "  ".join(f"g{g} {v:.4g}" for g, v in enumerate(values))


def _experts_comment(values: Sequence[float]) -> str:
    return "  ".join(f"e{e} {v:.3g}" for e, v in enumerate(values))


def statements(cand: Candidate, scores: ScoreTables, ffn: int) -> list[str]:
    out: list[str] = []
    if cand.keep:
        out.append(f"keep layers {Selection.from_ints(list(cand.keep))}  # --keep-last-layer")
    if cand.drop:
        note = cand.notes.get("drop", cand.label)
        out.append(f"drop layers {Selection.from_ints(list(cand.drop))}  # {note}")
        for name, layers in sorted(cand.bundles.items()):
            out.append(f"bundle {name} layers {Selection.from_ints(list(layers))}")
    comp = (" compensate" if cand.compensate else "") + (" reconstruct" if cand.reconstruct else "")
    for layer, groups in sorted(cand.groups_dropped.items()):
        metric = cand.unit_metric
        table = scores.tables.get(table_name(metric, layer, "attn"))
        if table is None:  # the error names the metrics that were measured
            table = scores.width(metric, layer).groups
        out.append(
            f"attn layers {layer} drop groups {Selection.from_ints(list(groups))}{comp}"
            f"  # {metric}: {_scores_comment(table)}"
        )
    rescale = " rescale" if cand.experts_rescale else ""
    for layer, experts in sorted(cand.experts_dropped.items()):
        if experts:
            table = scores.tables.get(table_name(cand.metric, layer, "experts"))
            note = f"  # {cand.metric}: {_experts_comment(table)}" if table is not None else ""
            gone = Selection.from_ints(list(experts))
            out.append(f"moe layers {layer} drop experts {gone}{rescale}{note}")
    for what, width in (("experts", cand.expert_width), ("shared", cand.shared_width)):
        if width is not None and cand.moe_layers:
            layers = Selection.from_ints(list(cand.moe_layers))
            out.append(f"moe layers {layers} {what} width {width} by {cand.unit_metric}")
    by_width: dict[int, list[int]] = defaultdict(list)
    for layer, width in cand.mlp_width.items():
        by_width[width].append(layer)
    for width, layers in sorted(by_width.items(), key=lambda kv: (min(kv[1]), kv[0])):
        out.append(
            f"mlp layers {Selection.from_ints(layers)} width {width} by {cand.unit_metric}{comp}"
            f"  # keeps {width / ffn:.1%} of {ffn} channels"
        )
    return out


def plan_text(cand: Candidate, header: Header, scores: ScoreTables, ffn: int) -> str:
    lines = [f"# {p}" if p else "#" for p in header.provenance]
    lines += [f"# chosen: {cand.label}", "plan 1", header.model_block.rstrip("\n")]
    lines.append(f"source {quote(header.source)}")
    lines.append(f"scores {quote(header.scores_file)} sha256 {quote(header.scores_sha256)}")
    lines.append(f"calibration {header.calibration}")
    lines.append("")
    lines += statements(cand, scores, ffn)
    result = format_source("\n".join(lines) + "\n")
    if result.text is None:  # pragma: no cover - an emitter bug
        raise AssertionError(f"plangen wrote a plan fmt refuses: {result.reason}")
    return result.text
