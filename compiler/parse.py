"""Text → syntax tree (lark, `grammar/plan.lark`) → typed IR (`compiler.ir`).

Parse failures never reach the user as lark exceptions: each becomes a
`Diagnostic` that names what was expected. After a syntax error the offending
statement is blanked out and parsing resumes, so one run reports every syntax
error in the file. Structural problems found while building the IR (duplicate
or missing header statements, a wrong version) are diagnostics too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from compiler import ir
from compiler.diagnostics import Diagnostic, error
from grammar import grammar_text

LANGUAGE_VERSION = 1
STATEMENT_KEYWORDS = (
    "plan",
    "model",
    "source",
    "scores",
    "calibration",
    "keep",
    "drop",
    "bundle",
    "attn",
    "mlp",
    "moe",
)


@functools.cache
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True)


@functools.cache
def _terminal_text() -> dict[str, str]:
    """Terminal name → how to show it to a person (`width`, `..`, an integer)."""
    shown = {"INT": "an integer", "NAME": "a name", "STRING": "a quoted string"}
    shown["_NL"] = "end of line"
    shown["$END"] = "end of file"
    for t in _parser().terminals:
        if t.name not in shown and t.pattern.type == "str":
            shown[t.name] = f"`{t.pattern.value}`"
    return shown


@dataclass(frozen=True)
class ParseResult:
    plan: ir.Plan | None
    diagnostics: tuple[Diagnostic, ...]
    source: str


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a plan is checked.

    Parsing allocates several objects per index (tokens, tree nodes, ranges,
    diagnostics) and frees none of them until the end; each automatic
    collection meanwhile rescans everything allocated so far, which made a
    100k-index selection about a third slower than linear. The objects are
    freed by reference counting as usual, and the collector runs again after.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse(text: str) -> ParseResult:
    """Parse plan text; on syntax errors `plan` is None and every error is listed."""
    with gc_paused():
        return _parse(text)


def _parse(text: str) -> ParseResult:
    syntax_errors: list[Diagnostic] = []
    lines = text.split("\n")
    work, rows = text, _Rows()  # the text parsed in this round, and its file lines
    resume = _Resume(lines)
    tree: Tree | None = None
    for _ in range(len(lines) + 1):
        try:
            tree = _parser().parse(work)
            break
        except UnexpectedInput as exc:
            syntax_errors.append(_moved(_syntax_diagnostic(exc, work), rows))
            if isinstance(exc, UnexpectedEOF) or (
                isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
            ):
                break
            start = _blank_statement(lines, rows.file_line(exc.line))
            if start is None:
                break
            resume.skip_parsed(start)
            work, rows = resume.work()
    if tree is not None and not syntax_errors:  # (with syntax errors nothing is built)
        syntax_errors = _overlong_numbers(tree, text)
    if syntax_errors or tree is None:
        return ParseResult(None, tuple(syntax_errors), text)
    builder = _Builder(text)
    plan = builder.build(tree)
    return ParseResult(plan, tuple(builder.diagnostics), text)


# ---- syntax errors -----------------------------------------------------------


def _syntax_diagnostic(exc: UnexpectedInput, text: str) -> Diagnostic:
    shown = _terminal_text()
    if isinstance(exc, UnexpectedCharacters):
        # The character at the offset lark reports (not looked up by line: lark
        # counts lines on \n only, `str.splitlines` also on \f, \x85, \u2028...).
        char = text[exc.pos_in_stream : exc.pos_in_stream + 1]
        span = ir.Span(exc.line, exc.column, exc.line, exc.column + 1)
        help_ = None
        if char == "-":
            help_ = "indices and widths are non-negative integers; ranges are written `A..B`"
        elif char in "'":
            help_ = 'strings are written in double quotes: "..."'
        return error("P001", f"unexpected character `{char}`", span, help_)
    expected = sorted({shown.get(e, e) for e in exc.expected if not e.startswith("__ANON")})
    if isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    ):
        lines = text.rstrip("\n").split("\n")
        span = ir.Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        return error("P001", f"unexpected end of file, expected {_one_of(expected)}", span)
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    span = _span(token)
    at_statement_start = any(e in exc.expected for e in ("KEEP", "ATTN", "MLP", "PLAN"))
    if token.type == "_NL":
        span = ir.Span(token.line, token.column, token.line, token.column + 1)
        return error("P001", f"unexpected end of line, expected {_one_of(expected)}", span)
    if at_statement_start and token.type == "NAME":
        close = difflib.get_close_matches(str(token), STATEMENT_KEYWORDS, n=1)
        help_ = f"did you mean `{close[0]}`?" if close else None
        help_ = help_ or "statements are: " + ", ".join(STATEMENT_KEYWORDS)
        return error("P002", f"unknown statement `{token}`", span, help_)
    keywords = [e.strip("`") for e in expected if e.startswith("`") and e[1:-1].isalpha()]
    if token.type == "NAME" and keywords:
        close = difflib.get_close_matches(str(token), keywords, n=1)
        help_ = f"did you mean `{close[0]}`?" if close else None
        return error(
            "P003", f"unknown keyword `{token}`, expected {_one_of(expected)}", span, help_
        )
    found = shown.get(token.type, token.type) if token.type not in ("INT", "NAME") else None
    found = f"`{token}`" if found is None or found.startswith("`") else found
    return error("P001", f"expected {_one_of(expected)}, found {found}", span)


def _moved(d: Diagnostic, rows: _Rows) -> Diagnostic:
    """`d` found in a round's text made of the file's `rows`: at its place in the file."""
    if rows == _Rows() or not d.span.line:
        return d
    sp = d.span
    span = ir.Span(rows.file_line(sp.line), sp.col, rows.file_line(sp.end_line), sp.end_col)
    return dataclasses.replace(d, span=span)


# No index, width or fact comes near this many digits; Python refuses to convert
# a string of more than 4,300 digits to an int (and back), so a longer number
# is a syntax error here, never a ValueError further on.
MAX_DIGITS = 100


def _overlong_numbers(tree: Tree, text: str) -> list[Diagnostic]:
    """P001 for every integer longer than `MAX_DIGITS` digits. The tree is only
    walked when the text has such a run of digits (in a string or comment it is
    harmless, and then no INT token is found)."""
    if not re.search(f"[0-9]{{{MAX_DIGITS + 1}}}", text):
        return []
    return [
        error(
            "P001",
            f"number too long ({len(t):,} digits; a plan's numbers have at most {MAX_DIGITS})",
            ir.Span(t.line, t.column, t.line, t.column + len(t)),
            "indices, widths and model facts are small integers: check this one",
        )
        for t in tree.scan_values(
            lambda v: isinstance(v, Token) and v.type == "INT" and len(v) > MAX_DIGITS
        )
    ]


def _one_of(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return "one of " + ", ".join(items)


def _blank_statement(lines: list[str], line_no: int) -> int | None:
    """Replace the statement on `line_no` (1-based) with spaces, to resume parsing;
    return its first line (0-based), or None when there is nothing left to blank.

    A line that opens a `{` is blanked through the line that closes it, so a
    broken `model` header does not cascade into one error per fact. Blanking
    keeps every line's length, so positions in later rounds are the file's.
    """
    if not 1 <= line_no <= len(lines):
        return None
    start = line_no - 1
    end = start
    if "{" in lines[start] and "}" not in lines[start]:
        while end + 1 < len(lines) and "}" not in lines[end]:
            end += 1
    if not any(lines[i].strip(" ") for i in range(start, end + 1)):
        return None
    for i in range(start, end + 1):
        lines[i] = " " * len(lines[i])
    return start


class _Resume:
    """What the next parse round reads after a syntax error: the last whole
    statement that parsed, then the file from the first line not yet known to
    lie between statements (`rows`: the file lines it is made of, 0-based).

    The lines left out parsed before the error, as whole statements (a
    statement ends at a newline outside braces), or are blank or comments
    between statements: parsing them again could only find the same, and a
    blank line changes nothing after it. The last statement is kept so the
    parser resumes in the state it had (the expected tokens the next error
    names stay the same). Each line is scanned and parsed about once, so a file
    with an error on every line is checked in linear time, not quadratic.
    """

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.scanned = 0  # lines[:scanned] end outside every `{ }`
        self.last: tuple[int, int] | None = None  # first, last line of the last statement

    def skip_parsed(self, stop: int) -> None:
        """`lines[:stop]` parsed without error (line `stop` starts the failed statement)."""
        depth, item = 0, None
        for i in range(self.scanned, stop):
            depth, item = _scan_braces(self.lines[i], i, depth, item)
            if depth == 0:
                if item is not None:
                    self.last, item = (item, i), None  # a statement ends at this newline
                self.scanned = i + 1

    def work(self) -> tuple[str, _Rows]:
        """The next round's text, and which file lines it is made of."""
        first, last = self.last if self.last is not None else (0, -1)
        head = self.lines[first : last + 1]
        rows = _Rows(first, len(head), self.scanned)
        return "\n".join(head + self.lines[self.scanned :]), rows


@dataclass(frozen=True)
class _Rows:
    """Which file line each line of a parse round's text is: `head` lines from
    `head_start`, then every line from `tail_start`."""

    head_start: int = 0
    head: int = 0
    tail_start: int = 0

    def file_line(self, line: int) -> int:
        """The file's 1-based line number of the text's `line` (1-based)."""
        if line < 1:
            return line
        i = line - 1
        return (self.head_start + i if i < self.head else self.tail_start + i - self.head) + 1


def _scan_braces(line: str, number: int, depth: int, item: int | None) -> tuple[int, int | None]:
    """(depth after `line`, first line of the statement open after it) as the lexer
    sees braces: not inside strings (`\\` and `\"` escapes) or comments."""
    if not line.strip(" \t\f\r"):
        return depth, item
    for _col, char in _outside_strings(line):
        if char == "#":
            break
        if char not in " \t\f\r" and depth == 0 and item is None:
            item = number  # a statement starts on this line
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
    return depth, item


def _outside_strings(line: str) -> Iterator[tuple[int, str]]:
    """(column, character) of each character of `line` outside strings, as the lexer
    reads them (`\\` and `\"` escapes); an opening quote counts as outside."""
    in_string = escaped = False
    for col, char in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        yield col, char
        if char == '"':
            in_string = True


# ---- comments ------------------------------------------------------------------


def scan_comments(text: str) -> tuple[ir.Comment, ...]:
    """Every `#` comment with its line, and whether code precedes it on that line.

    Lines are counted as the parser counts them, on \n only (a \f or \u2028 in a
    string or comment does not start a line; `str.splitlines` would say it does).
    """
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        for col, char in _outside_strings(line):
            if char == "#":
                out.append(ir.Comment(line[col:].rstrip(), number, bool(line[:col].strip())))
                break
    return tuple(out)


# ---- syntax tree → IR ------------------------------------------------------------


def _span(token: Token | Tree) -> ir.Span:
    if isinstance(token, Tree):
        m = token.meta
        return ir.Span(m.line, m.column, m.end_line, m.end_column)
    return ir.Span(token.line, token.column, token.end_line, token.end_column)


def unquote(token: str) -> str:
    """The value of a STRING token: strip quotes, undo `\\"` and `\\\\`."""
    body = token[1:-1]
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _selection(tree: Tree) -> ir.Selection:
    """A `selection` node: its children are INT tokens (single indices) and
    `range` nodes (`lo..hi`)."""
    ranges = []
    for item in tree.children:
        if isinstance(item, Token):
            ranges.append(ir.Range(int(item), int(item), _span(item)))
        else:
            lo, hi = item.children
            ranges.append(ir.Range(int(lo), int(hi), _span(item)))
    return ir.Selection.of(ranges)


def _width(int_token: Token, by: Tree | None) -> ir.Width:
    if by is None:
        return ir.Width(int(int_token), "magnitude", _span(int_token))
    name = by.children[0]
    return ir.Width(int(int_token), str(name), _span(int_token), _span(name))


class _Builder:
    """Walks the lark tree once, building IR and structural diagnostics."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.diagnostics: list[Diagnostic] = []

    def build(self, tree: Tree) -> ir.Plan:
        version, version_span = 0, ir.NOWHERE
        header: dict[str, object] = {}
        statements: list[ir.Statement] = []
        for node in tree.children:
            kind = node.data
            if kind in ("plan_version", "model_block", "source", "scores", "calibration"):
                if kind in header or (kind == "plan_version" and version_span != ir.NOWHERE):
                    code = "P007" if kind == "model_block" else "P008"
                    what = {"model_block": "model", "plan_version": "plan"}.get(kind, kind)
                    self.diagnostics.append(
                        error(code, f"`{what}` is stated twice", _span(node), "keep only one")
                    )
                    continue
                if kind == "plan_version":
                    version, version_span = int(node.children[0]), _span(node.children[0])
                    header[kind] = version
                else:
                    header[kind] = getattr(self, kind)(node)
            else:
                statements.append(getattr(self, kind)(node))
        if version_span == ir.NOWHERE:
            self.diagnostics.append(
                error(
                    "P005",
                    "the plan does not start with a `plan` version line",
                    ir.Span(1, 1, 1, 2),
                    f"add `plan {LANGUAGE_VERSION}` as the first line",
                )
            )
        elif version != LANGUAGE_VERSION:
            self.diagnostics.append(
                error(
                    "P004",
                    f"plan language version {version} is not supported",
                    version_span,
                    f"this plancc reads `plan {LANGUAGE_VERSION}`",
                )
            )
        if "model_block" not in header:
            self.diagnostics.append(
                error(
                    "P006",
                    "the plan has no `model { ... }` block",
                    version_span if version_span != ir.NOWHERE else ir.Span(1, 1, 1, 2),
                    "print one for your checkpoint with `plangen header MODEL_DIR`",
                )
            )
        return ir.Plan(
            version=version,
            model=header.get("model_block"),  # type: ignore[arg-type]
            source=header.get("source"),  # type: ignore[arg-type]
            scores=header.get("scores"),  # type: ignore[arg-type]
            calibration=header.get("calibration"),  # type: ignore[arg-type]
            statements=tuple(statements),
            version_span=version_span,
            comments=scan_comments(self.text),
        )

    # header
    def model_block(self, node: Tree) -> ir.ModelBlock:
        name = unquote(node.children[0])
        facts = []
        for fact in node.children[1:]:
            key, value_tree = fact.children
            raw = value_tree.children[0]
            if isinstance(raw, Tree):  # a selection
                sel = _selection(raw)
                single = len(sel.ranges) == 1 and sel.ranges[0].lo == sel.ranges[0].hi
                value: object = sel.ranges[0].lo if single else sel
            elif raw.type == "STRING":
                value = unquote(raw)
            elif str(raw) in ("true", "false"):
                value = str(raw) == "true"
            else:
                value = str(raw)
            facts.append(ir.Fact(str(key), value, _span(key), _span(value_tree)))
        return ir.ModelBlock(name, tuple(facts), _span(node))

    def source(self, node: Tree) -> ir.Source:
        return ir.Source(unquote(node.children[0]), _span(node.children[0]))

    def scores(self, node: Tree) -> ir.Scores:
        path, sha = node.children
        return ir.Scores(unquote(path), unquote(sha), _span(path), _span(sha))

    def calibration(self, node: Tree) -> ir.Calibration:
        data = node.children[0]
        data_text = unquote(data) if data.type == "STRING" else str(data)
        options = tuple((str(o.children[0]), int(o.children[1])) for o in node.children[1:])
        return ir.Calibration(data_text, options, _span(node))

    # statements
    def keep_layers(self, node: Tree) -> ir.KeepLayers:
        return ir.KeepLayers(_selection(node.children[0]), _span(node))

    def drop_layers(self, node: Tree) -> ir.DropLayers:
        return ir.DropLayers(_selection(node.children[0]), _span(node))

    def bundle(self, node: Tree) -> ir.Bundle:
        name, sel = node.children
        return ir.Bundle(_selection(sel), _span(node), str(name), _span(name))

    def attn(self, node: Tree) -> ir.AttnDropGroups:
        layers, groups, *rest = node.children
        comp = next((r for r in rest if r.data == "compensate"), None)
        rec = next((r for r in rest if r.data == "reconstruct"), None)
        return ir.AttnDropGroups(
            _selection(layers),
            _span(node),
            _selection(groups),
            comp is not None,
            _span(comp) if comp is not None else ir.NOWHERE,
            rec is not None,
            _span(rec) if rec is not None else ir.NOWHERE,
        )

    def mlp(self, node: Tree) -> ir.MlpWidth:
        layers, width, *rest = node.children
        by = next((r for r in rest if r.data == "by_metric"), None)
        comp = next((r for r in rest if r.data == "compensate"), None)
        rec = next((r for r in rest if r.data == "reconstruct"), None)
        return ir.MlpWidth(
            _selection(layers),
            _span(node),
            _width(width, by),
            comp is not None,
            _span(comp) if comp is not None else ir.NOWHERE,
            rec is not None,
            _span(rec) if rec is not None else ir.NOWHERE,
        )

    def moe(self, node: Tree) -> ir.Statement:
        layers, action = node.children
        sel = _selection(layers)
        if action.data == "moe_drop_experts":
            experts, *rest = action.children
            rescale = rest[0] if rest else None
            return ir.MoeDropExperts(
                sel,
                _span(node),
                _selection(experts),
                rescale is not None,
                _span(rescale) if rescale is not None else ir.NOWHERE,
            )
        width = _width(action.children[0], action.children[1] if len(action.children) > 1 else None)
        if action.data == "moe_experts_width":
            return ir.MoeExpertsWidth(sel, _span(node), width)
        return ir.MoeSharedWidth(sel, _span(node), width)
