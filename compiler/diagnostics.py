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
    # the checkpoint (check --model, apply)
    "P130": "model fact disagrees with the checkpoint",
    "P131": "fingerprint disagrees with the checkpoint",
    # warnings
    "W001": "the last layer is dropped",
    "W002": "heterogeneous result: widths differ across layers",
    "W003": "width not a multiple of 8",
    "W004": "statement changes nothing",
    "W005": "no fingerprint: the plan is not pinned to a checkpoint",
}


@dataclass(frozen=True)
class Diagnostic:
    """One problem at one place in a plan file."""

    code: str
    message: str
    span: Span = NOWHERE
    help: str | None = None
    notes: tuple[str, ...] = field(default=())

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


def render_text(diags: Iterable[Diagnostic], path: str, source: str) -> str:
    """rustc/ruff style: location, code and message, the line, a caret, help."""
    lines = source.splitlines()
    chunks = []
    for d in diags:
        loc = f"{path}:{d.span.line}:{d.span.col}" if d.span.line else path
        out = [f"{loc}: {d.severity.value}[{d.code}]: {d.message}"]
        if 0 < d.span.line <= len(lines):
            text = lines[d.span.line - 1].replace("\t", " ")
            gutter = f"{d.span.line:>4} | "
            out.append(gutter + text)
            pad = " " * (len(gutter) - 2) + "| " + " " * (d.span.col - 1)
            out.append(pad + "^" * max(1, min(d.span.width, len(text) - d.span.col + 1)))
        out.extend(f"  = note: {n}" for n in d.notes)
        if d.help:
            out.append(f"  = help: {d.help}")
        chunks.append("\n".join(out))
    return "\n\n".join(chunks)


def summary_line(diags: list[Diagnostic]) -> str:
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    if not diags:
        return "no problems found"
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' * (errors != 1)}")
    if warnings:
        parts.append(f"{warnings} warning{'s' * (warnings != 1)}")
    return "found " + " and ".join(parts)


def render_json(diags: Iterable[Diagnostic], path: str) -> str:
    """One JSON object per line, for editors and CI."""
    rows = []
    for d in diags:
        rows.append(
            json.dumps(
                {
                    "path": path,
                    "line": d.span.line,
                    "column": d.span.col,
                    "end_line": d.span.end_line,
                    "end_column": d.span.end_col,
                    "severity": d.severity.value,
                    "code": d.code,
                    "message": d.message,
                    "help": d.help,
                },
                sort_keys=True,
            )
        )
    return "\n".join(rows)
