"""Diagnostics as data, and the two renderers (human text and JSON lines).

Every problem the compiler can report has a stable code listed in `CODES`;
the code's first letter says its severity (`P` error, `W` warning). Tests
assert codes, lines and columns, so codes are never renumbered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from compiler.ir import NOWHERE, Span


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


# code -> one-line summary (the table of everything `plancc check` reports).
CODES: dict[str, str] = {
    # syntax and file structure
    "P001": "syntax error",
    "P002": "unknown statement",
    "P003": "unknown keyword or model fact",
    "P004": "unsupported plan version",
    "P005": "missing `plan` version line",
    "P006": "missing `model` block",
    "P007": "duplicate `model` block",
    "P008": "duplicate header statement (`plan`, `source`, `scores`, `calibration`)",
    "P009": "a model fact stated twice",
    "P010": "unknown architecture",
    "P011": "invalid value for a model fact",
    # model facts and indices
    "P101": "a model fact needed by a statement is missing",
    "P102": "reversed range",
    "P103": "an index listed twice in one selection",
    "P104": "index out of range",
    # decisions
    "P105": "the same decision made twice for one layer",
    "P106": "a statement on a dropped layer",
    "P107": "every layer dropped",
    "P108": "dropping a layer that `keep` guards",
    "P109": "every KV group of a layer dropped",
    "P110": "width out of range",
    "P111": "fewer experts left than top_k",
    "P112": "expert count no longer divisible by the expert-group count",
    "P113": "bundle names a layer that is not dropped",
    "P114": "two bundles share a layer",
    "P115": "bundles do not cover every dropped layer",
    "P116": "bundle declared twice",
    "P117": "statement does not fit the layer's kind (dense MLP vs MoE)",
    # the scores sidecar
    "P120": "score table missing from the sidecar",
    "P121": "sidecar sha256 differs",
    "P122": "sidecar table shape does not match the model",
    "P123": "sidecar file cannot be read",
    "P124": "reconstructed weights were solved for a different plan",
    "P125": "`compensate` and `reconstruct` on one statement",
    "P126": "attention that cannot be narrowed (multi-head latent attention)",
    "P127": "the sidecar was measured on other weights than the plan's `weights`",
    # the checkpoint (check --model, apply)
    "P130": "model fact disagrees with the checkpoint",
    "P131": "fingerprint disagrees with the checkpoint",
    "P132": "`weights` disagrees with the checkpoint's weights (same structure, other weights)",
    # serving targets (check --target; the rules live in compiler/targets.py)
    "P140": "layers differ in shape, and the target describes every layer with one shape",
    "P141": "`compensate` adds an output bias the target cannot load",
    "P142": "the family's transformers config class refuses the result's shapes",
    "P143": "the target does not run this model family",
    "P144": "the target runs no mixture-of-experts layers",
    "P145": "query heads differ across layers, and the target keeps them global",
    "P146": "an MLP width is not a multiple of the target's granularity (`ffn_multiple`)",
    # warnings
    "W001": "the last layer is dropped",
    "W002": "heterogeneous result: widths differ across layers",
    "W003": "width not a multiple of 8",
    "W004": "statement changes nothing",
    "W005": "no fingerprint: the plan is not pinned to a checkpoint",
    "W006": "the plan removes most of the model (more than half its layers or parameters)",
}


@dataclass(frozen=True)
class Diagnostic:
    """One problem at one place in a plan file."""

    code: str
    message: str
    span: Span = NOWHERE
    help: str | None = None
    notes: tuple[str, ...] = field(default=())
    # How many problems this diagnostic stands for: 1, or N for the
    # `... and N more` diagnostic that `cap_repeats` folds a long run into.
    count: int = 1

    @property
    def severity(self) -> Severity:
        return Severity.WARNING if self.code.startswith("W") else Severity.ERROR

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


def error(code: str, message: str, span: Span = NOWHERE, help: str | None = None) -> Diagnostic:
    assert code in CODES and code.startswith("P"), code
    return Diagnostic(code, message, span, help)


def warning(code: str, message: str, span: Span = NOWHERE, help: str | None = None) -> Diagnostic:
    assert code in CODES and code.startswith("W"), code
    return Diagnostic(code, message, span, help)


def sort_diagnostics(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Source order, then code; exact duplicates dropped."""
    seen: set[tuple[str, str, Span]] = set()
    out = []
    for d in sorted(diags, key=lambda d: (d.span.line, d.span.col, d.code, d.message)):
        key = (d.code, d.message, d.span)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# At most this many diagnostics of one code per statement (source line) are
# listed; the rest become one `... and N more` diagnostic with that code.
REPEAT_LIMIT = 5
# How the folded rest is named, per code that repeats within one statement.
_REPEATED = {
    "P102": "reversed ranges",
    "P103": "indices listed twice",
    "P104": "indices out of range",
}


def cap_repeats(diags: Iterable[Diagnostic], limit: int = REPEAT_LIMIT) -> list[Diagnostic]:
    """Fold long runs: per (code, line), the first `limit` in source order, then one
    `... and N more` diagnostic (same code, at the first one left out, `count` N).

    A run of `limit + 1` is listed whole (folding one would hide nothing). Input
    order is kept otherwise; linear apart from sorting each long run.
    """
    diags = list(diags)
    runs: dict[tuple[str, int], list[int]] = {}
    for i, d in enumerate(diags):
        if d.span.line:
            runs.setdefault((d.code, d.span.line), []).append(i)
    drop: set[int] = set()
    folded: dict[int, Diagnostic] = {}
    for (code, _line), members in runs.items():
        if len(members) <= limit + 1:
            continue
        members.sort(key=lambda i: (diags[i].span, diags[i].message))
        first_hidden = diags[members[limit]]
        rest = sum(diags[i].count for i in members[limit:])
        what = _REPEATED.get(code, f"`{code}` problems ({CODES[code]})")
        folded[members[limit]] = Diagnostic(
            code,
            f"... and {rest:,} more {what} in this statement",
            first_hidden.span,
            first_hidden.help,
            count=rest,
        )
        drop.update(members[limit + 1 :])
    return [folded.get(i, d) for i, d in enumerate(diags) if i not in drop]


def render_text(diags: Iterable[Diagnostic], path: str, source: str) -> str:
    """rustc/ruff style: location, code and message, the line, a caret, help."""
    lines = source.split("\n")  # lines as the parser counts them (only \n ends one)
    chunks = []
    for d in diags:
        loc = f"{path}:{d.span.line}:{d.span.col}" if d.span.line else path
        out = [f"{loc}: {d.severity.value}[{d.code}]: {d.message}"]
        if 0 < d.span.line <= len(lines):
            text, col = _excerpt(lines[d.span.line - 1].replace("\t", " "), d.span.col)
            gutter = f"{d.span.line:>4} | "
            out.append(gutter + text)
            pad = " " * (len(gutter) - 2) + "| " + " " * (col - 1)
            out.append(pad + "^" * max(1, min(d.span.width, len(text) - col + 1)))
        out.extend(f"  = note: {n}" for n in d.notes)
        if d.help:
            out.append(f"  = help: {d.help}")
        chunks.append("\n".join(out))
    return "\n\n".join(chunks)


# A source line longer than this is shown as a window around the caret, so a
# diagnostic on a 10,000-index selection prints a screen line, not 50 kB.
EXCERPT_WIDTH = 100


def _excerpt(text: str, col: int) -> tuple[str, int]:
    """(the part of `text` shown, the caret's column in it); `...` marks cuts."""
    if len(text) <= EXCERPT_WIDTH:
        return text, col
    lo = max(0, min(col - 1 - EXCERPT_WIDTH // 3, len(text) - EXCERPT_WIDTH))
    pre = "..." if lo else ""
    post = "..." if lo + EXCERPT_WIDTH < len(text) else ""
    return pre + text[lo : lo + EXCERPT_WIDTH] + post, col - lo + len(pre)


def summary_line(diags: list[Diagnostic]) -> str:
    """`found 2 errors and 1 warning`; problems folded by `cap_repeats` are counted
    too, and then the number of diagnostics listed is added: `(7 listed)`."""
    errors = sum(d.count for d in diags if d.is_error)
    warnings = sum(d.count for d in diags if not d.is_error)
    if not diags:
        return "no problems found"
    parts = []
    if errors:
        parts.append(f"{errors:,} error{'s' * (errors != 1)}")
    if warnings:
        parts.append(f"{warnings:,} warning{'s' * (warnings != 1)}")
    listed = f" ({len(diags):,} listed)" if errors + warnings != len(diags) else ""
    return "found " + " and ".join(parts) + listed


def render_json(diags: Iterable[Diagnostic], path: str) -> str:
    """One JSON object per line, for editors and CI.

    A `... and N more` diagnostic (see `cap_repeats`) also has `"count": N`.
    """
    rows = []
    for d in diags:
        row: dict[str, object] = {
            "path": path,
            "line": d.span.line,
            "column": d.span.col,
            "end_line": d.span.end_line,
            "end_column": d.span.end_col,
            "severity": d.severity.value,
            "code": d.code,
            "message": d.message,
            "help": d.help,
        }
        if d.count != 1:
            row["count"] = d.count
        rows.append(json.dumps(row, sort_keys=True))
    return "\n".join(rows)
