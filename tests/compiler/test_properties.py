"""Property-based tests of the parser, the formatter and the checker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.check import check_text
from compiler.fmt import format_plan
from compiler.parse import parse
from tests.helpers.strategies import plans


@given(plans())
def test_fmt_is_idempotent_and_keeps_meaning(text: str) -> None:
    parsed = parse(text)
    assert parsed.plan is not None, parsed.diagnostics
    once = format_plan(parsed.plan)
    again = parse(once)
    assert again.plan == parsed.plan  # parse(fmt(p)) == parse(p)
    assert format_plan(again.plan) == once  # fmt(fmt(p)) == fmt(p)


@given(plans())
def test_fmt_keeps_every_comment(text: str) -> None:
    parsed = parse(text)
    assert parsed.plan is not None
    before = sorted(c.text for c in parsed.plan.comments)
    after = parse(format_plan(parsed.plan))
    assert after.plan is not None
    assert sorted(c.text for c in after.plan.comments) == before


@given(plans())
def test_fmt_keeps_the_check_verdict(text: str) -> None:
    parsed = parse(text)
    assert parsed.plan is not None
    a = check_text(text)
    b = check_text(format_plan(parsed.plan))
    assert {d.code for d in a.diagnostics} == {d.code for d in b.diagnostics}
    assert a.resolved == b.resolved


MUTATION_CHARS = [*list('0123456789.,{}"#\\ \n\t-_abz'), "..", "layers", "drop", "width", "ü"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(plans())
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 3))
        if op == 0:
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        elif op == 1:
            text = text[:pos] + draw(st.sampled_from(MUTATION_CHARS)) + text[pos:]
        elif op == 2:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
            text = "\n".join(lines)
        else:
            text = text[:pos] + str(draw(st.integers(0, 10**12))) + text[pos:]
    return text


@settings(max_examples=300)
@given(mutated())
def test_mutations_never_crash(text: str) -> None:
    result = check_text(text)  # must return diagnostics, never raise
    assert result.ok == (not any(d.is_error for d in result.diagnostics))
    for d in result.diagnostics:
        assert d.span.line >= 1 or d.code in ("P006",)
    if result.plan is not None:
        format_plan(result.plan)  # fmt works on anything that parses
