"""The typed IR of a plan: frozen dataclasses, one per form of the language.

Every node carries a `Span` for diagnostics; spans and comments are excluded
from equality, so two texts that say the same thing compare equal
(`parse(fmt(p)) == parse(p)`). Selections keep their ranges (a range like
`0..1000000000` is never expanded before it has been checked).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


def canonical(obj: Any) -> Any:
    """A span-free, comment-free nested tuple of an IR value, for ordering and hashing."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return (
            type(obj).__name__,
            *tuple(canonical(getattr(obj, f.name)) for f in fields(obj) if f.compare),
        )
    if isinstance(obj, tuple | list):
        return tuple(canonical(x) for x in obj)
    return obj


@dataclass(frozen=True, order=True)
class Span:
    """1-based line and column of the first character, and the end column."""

    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    @property
    def width(self) -> int:
        if self.end_line == self.line and self.end_col > self.col:
            return self.end_col - self.col
        return 1


NOWHERE = Span(0, 0, 0, 0)


@dataclass(frozen=True)
class Range:
    """An inclusive range `lo..hi` (a single integer has lo == hi)."""

    lo: int
    hi: int
    span: Span = field(default=NOWHERE, compare=False)

    def __len__(self) -> int:
        return max(0, self.hi - self.lo + 1)


@dataclass(frozen=True)
class Selection:
    """A comma list of integers and ranges, in canonical (sorted, merged) form.

    Canonical form: ranges sorted by (lo, hi); ranges that touch without
    overlapping are merged. Overlaps are kept (they are duplicate indices, an
    error the checker reports with their position).
    """

    ranges: tuple[Range, ...]

    @staticmethod
    def of(ranges: list[Range] | tuple[Range, ...]) -> Selection:
        ordered = sorted(ranges, key=lambda r: (r.lo, r.hi))
        merged: list[Range] = []
        for r in ordered:
            last = merged[-1] if merged else None
            if last is not None and r.lo <= r.hi and last.lo <= last.hi and r.lo == last.hi + 1:
                span = Span(last.span.line, last.span.col, r.span.end_line, r.span.end_col)
                merged[-1] = Range(last.lo, r.hi, span)
            else:
                merged.append(r)
        return Selection(tuple(merged))

    @staticmethod
    def from_ints(values: list[int] | tuple[int, ...] | set[int]) -> Selection:
        """The canonical selection of these integers (runs of consecutive ones
        become ranges), built in one pass over them sorted, one Range per run."""
        ranges: list[Range] = []
        lo = hi = None
        for v in sorted(values):
            if hi is not None and v == hi + 1:
                hi = v
                continue
            if lo is not None:
                ranges.append(Range(lo, hi))  # type: ignore[arg-type]
            lo = hi = v
        if lo is not None:
            ranges.append(Range(lo, hi))  # type: ignore[arg-type]
        return Selection(tuple(ranges))

    def __iter__(self) -> Iterator[int]:
        for r in self.ranges:
            yield from range(r.lo, r.hi + 1)

    def within(self, n: int) -> list[int]:
        """The indices in 0..n-1, in order, without expanding what lies outside."""
        return [i for r in self.ranges for i in range(max(r.lo, 0), min(r.hi, n - 1) + 1)]

    def values(self) -> tuple[int, ...]:
        return tuple(self)

    @property
    def span(self) -> Span:
        return self.ranges[0].span if self.ranges else NOWHERE

    def __str__(self) -> str:
        return ", ".join(str(r.lo) if r.lo == r.hi else f"{r.lo}..{r.hi}" for r in self.ranges)


@dataclass(frozen=True)
class Fact:
    """One `key value` of the model block; value is int, str, bool or Selection."""

    key: str
    value: Any
    span: Span = field(default=NOWHERE, compare=False)
    value_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True, eq=False)
class ModelBlock:
    """The `model "NAME" { ... }` block. Equality ignores the order of facts."""

    name: str
    facts: tuple[Fact, ...]
    span: Span = field(default=NOWHERE, compare=False)

    def _key(self) -> tuple[Any, ...]:
        # repr: values of one key may differ in type (`layers 3` and `layers 3..5`)
        return (self.name, tuple(sorted(repr(canonical(f)) for f in self.facts)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelBlock) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(repr(self._key()))

    def get(self, key: str, default: Any = None) -> Any:
        for fact in self.facts:
            if fact.key == key:
                return fact.value
        return default

    def fact(self, key: str) -> Fact | None:
        return next((f for f in self.facts if f.key == key), None)

    def as_dict(self) -> dict[str, Any]:
        return {f.key: f.value for f in self.facts}


@dataclass(frozen=True)
class Source:
    path: str
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Scores:
    """The pinned sidecar of importance tables (`scores "x" sha256 "..."`)."""

    path: str
    sha256: str
    span: Span = field(default=NOWHERE, compare=False)
    sha_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Calibration:
    """Provenance only: which data the scores were measured on."""

    data: str
    options: tuple[tuple[str, int], ...]
    span: Span = field(default=NOWHERE, compare=False)


# ---- statements --------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """Base of the body statements; `layers` is the selection they apply to."""

    layers: Selection
    span: Span = field(default=NOWHERE, compare=False)

    kind = "statement"
    # Order of statement kinds in canonical layout (fmt) and in reports.
    order = 99


@dataclass(frozen=True)
class KeepLayers(Statement):
    kind = "keep layers"
    order = 0


@dataclass(frozen=True)
class DropLayers(Statement):
    kind = "drop layers"
    order = 1


@dataclass(frozen=True)
class Bundle(Statement):
    name: str = ""
    name_span: Span = field(default=NOWHERE, compare=False)
    kind = "bundle"
    order = 2


@dataclass(frozen=True)
class Width:
    """`width N [by METRIC]`: keep N channels chosen by METRIC (ties: lower index)."""

    n: int
    metric: str = "magnitude"
    span: Span = field(default=NOWHERE, compare=False)
    metric_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class AttnDropGroups(Statement):
    groups: Selection = field(default_factory=lambda: Selection(()))
    compensate: bool = False
    compensate_span: Span = field(default=NOWHERE, compare=False)
    reconstruct: bool = False  # o_proj's kept columns re-solved (sidecar `reconstruct.L.attn`)
    reconstruct_span: Span = field(default=NOWHERE, compare=False)
    kind = "attn"
    order = 3


@dataclass(frozen=True)
class MlpWidth(Statement):
    width: Width = field(default_factory=lambda: Width(0))
    compensate: bool = False
    compensate_span: Span = field(default=NOWHERE, compare=False)
    reconstruct: bool = False  # down_proj's kept columns re-solved (`reconstruct.L.mlp`)
    reconstruct_span: Span = field(default=NOWHERE, compare=False)
    kind = "mlp"
    order = 4


@dataclass(frozen=True)
class MoeDropExperts(Statement):
    experts: Selection = field(default_factory=lambda: Selection(()))
    # The kept experts' down projections scaled by 1 - the dropped experts' mean router
    # probability (sidecar `router_prob.L.experts`): routing renormalized over fewer
    # experts gives each survivor that much more weight, on average.
    rescale: bool = False
    rescale_span: Span = field(default=NOWHERE, compare=False)
    kind = "moe drop experts"
    order = 5


@dataclass(frozen=True)
class MoeExpertsWidth(Statement):
    width: Width = field(default_factory=lambda: Width(0))
    kind = "moe experts width"
    order = 6


@dataclass(frozen=True)
class MoeSharedWidth(Statement):
    width: Width = field(default_factory=lambda: Width(0))
    kind = "moe shared width"
    order = 7


@dataclass(frozen=True)
class Comment:
    """A `#` comment; `trailing` when it follows code on the same line."""

    text: str
    line: int
    trailing: bool


@dataclass(frozen=True, eq=False)
class Plan:
    """A parsed plan file. Order of `statements` is the source order.

    Equality ignores statement order, spans and comments: the plan is
    declarative, so two files listing the same statements are the same plan.
    """

    version: int
    model: ModelBlock | None
    source: Source | None
    scores: Scores | None
    calibration: Calibration | None
    statements: tuple[Statement, ...]
    version_span: Span = field(default=NOWHERE, compare=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False)

    def _key(self) -> tuple[Any, ...]:
        body = tuple(sorted(repr(canonical(s)) for s in self.statements))
        head = (self.version, self.model, self.source, self.scores, self.calibration)
        return (*head, body)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(repr(self._key()))
