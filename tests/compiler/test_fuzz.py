"""Fuzzing the compiler and the `plancc` entry point with valid and mutated plans.

For every input, `check_text` and `plancc check / fmt --check / fmt / diff`
(in process) must answer with a diagnostic and an exit status in {0, 1, 2},
never an exception. For every plan fmt accepts, fmt must be idempotent and
must not change what the plan means: the same problems (modulo positions),
the same resolved plan, and `diff_plans` finding no difference.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.check import CheckResult, check_text, resolve_anyway
from compiler.diagnostics import Diagnostic
from compiler.diff import diff_plans
from compiler.fmt import format_source
from compiler.parse import parse
from executor.cli import main as plancc
from tests.helpers.paths import EXAMPLES as EXAMPLE_DIR
from tests.helpers.strategies import plans

EXAMPLES = sorted(EXAMPLE_DIR.glob("*.prn"))
EXAMPLE_TEXTS = [p.read_text(encoding="utf-8") for p in EXAMPLES]
HEADER_LINES = [
    "plan 1",
    'source "models/other"',
    'scores "s.safetensors" sha256 "abc"',
    "calibration builtin samples 8 seqlen 64 seed 1",
    "  layers 30  hidden 576",
    "  tied true",
    "  arch llama",
    'model "again" {',
    "}",
]
NOISE = [
    *list('0123456789.,{}"#\\ -_az'),
    "\f",
    "\r",
    "\r\n",
    "\t",
    "\v",
    "\x85",
    "\u2028",
    "\u00fc",
    "\U0001f600",
    "# note",
    "..",
    "layers",
    "drop",
    "width",
    "\n",
]


@st.composite
def mutated_plans(draw: st.DrawFn) -> str:
    """An example plan or a generated valid one, then 1-6 random edits."""
    text = draw(st.one_of(st.sampled_from(EXAMPLE_TEXTS), plans()))
    for _ in range(draw(st.integers(1, 6))):
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        pos = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 8))
        if op == 0:  # delete a line
            del lines[i]
        elif op == 1:  # duplicate a line
            lines.insert(j, lines[i])
        elif op == 2:  # swap two lines
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:  # insert characters
            noise = "".join(draw(st.lists(st.sampled_from(NOISE), min_size=1, max_size=3)))
            text = text[:pos] + noise + text[pos:]
        elif op == 4:  # a number becomes huge
            numbers = list(re.finditer(r"[0-9]+", text))
            if numbers:
                m = numbers[draw(st.integers(0, len(numbers) - 1))]
                # ... or longer than Python converts to an int (4,300 digits)
                huge = draw(st.sampled_from(["2147483648", "1099511627777", "1" + "0" * 30]))
                huge = draw(st.sampled_from([huge, "9" * 5000]))
                text = text[: m.start()] + huge + text[m.end() :]
        elif op == 5:  # a header line again
            lines.insert(j, draw(st.sampled_from(HEADER_LINES)))
        elif op == 6:  # truncate
            text = text[:pos]
        elif op == 7:  # any text at all
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos:]
        else:  # delete a few characters
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        if op in (0, 1, 2, 5):
            text = "\n".join(lines)
    return text


# Codes whose message names what an EARLIER statement already decided (the
# first of two `drop`s, the first bundle holding a layer): fmt reorders
# statements, so which one is first, and the message, may change; the code stays.
ORDER_DEPENDENT = ("P105", "P114", "P116")


def problems(result: CheckResult) -> set[tuple[str, str]]:
    """(code, message) of every diagnostic, modulo positions: line numbers in
    messages erased, and order-dependent messages reduced to their code. A run
    that `cap_repeats` folded lists its first few in source order, which `fmt`
    may change: such a run counts as its code and its total size."""
    runs: dict[tuple[str, int], list[Diagnostic]] = {}
    for d in result.diagnostics:
        runs.setdefault((d.code, d.span.line), []).append(d)
    out = set()
    for (code, _line), run in runs.items():
        if any(d.count > 1 for d in run):
            out.add((code, f"{sum(d.count for d in run)} in one statement"))
            continue
        for d in run:
            text = "" if code in ORDER_DEPENDENT else re.sub(r"line \d+", "line N", d.message)
            out.add((code, text))
    return out


@contextlib.contextmanager
def plan_file(text: str, name: str = "p.prn") -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        yield path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = plancc(list(argv))
        except SystemExit as exc:  # argparse; never expected here
            code = exc.code  # type: ignore[assignment]
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Loadability verdicts of random shapes go to a throwaway cache, not ~/.cache."""
    monkeypatch.setenv("PLANCC_CACHE", str(tmp_path_factory.mktemp("cache")))


def assert_fmt_keeps_meaning(text: str) -> None:
    """What every plan fmt accepts must satisfy; nothing when fmt refuses it."""
    result = format_source(text)
    if result.text is None:
        assert result.diagnostics and result.reason
        return
    formatted = result.text
    assert format_source(formatted).text == formatted  # idempotent
    again = parse(formatted)
    assert again.plan == parse(text).plan and not any(d.is_error for d in again.diagnostics)
    before, after = check_text(text), check_text(formatted)
    assert problems(after) == problems(before)
    assert after.resolved == before.resolved
    if before.resolved is not None and after.resolved is not None:
        assert diff_plans(before.resolved, after.resolved) == (False, "no difference")


def assert_cli_survives(text: str) -> None:
    """check, fmt --check, fmt and diff: an exit status, never an exception. diff
    compares the plan with its formatted self, errors or not (exit 1 when it has
    errors, listed after `no difference`); 2 only when there is no model to compare."""
    with plan_file(text) as path, plan_file(text, "orig.prn") as orig:
        text = path.read_text(encoding="utf-8")  # as plancc reads it (\r\n, \r → \n)
        code, _, _ = cli("check", str(path))
        assert code in (0, 1)  # 2 is for usage and I/O errors only
        accepted = format_source(text).text
        code, _, err = cli("fmt", "--check", str(path))
        assert code == (1 if accepted is None or accepted != text else 0)
        assert (accepted is None) == ("not formatted:" in err)
        code, _, err = cli("fmt", str(path))
        assert code == (1 if accepted is None else 0)
        assert path.read_text(encoding="utf-8") == (text if accepted is None else accepted)
        code, out, err = cli("diff", str(orig), str(path))
        result = check_text(text)
        if resolve_anyway(result) is None:  # nothing to compare: a usage error
            assert (code, out) == (2, "") and "nothing to compare" in err
        elif result.ok:
            assert (code, out) == (0, "no difference\n")
        else:  # compared as far as it resolves (two decisions for one layer: the
            # later counts, and fmt may reorder them), then what does not check
            assert code == 1
            assert f"\n{orig} does not check: " in out and f"\n{path} does not check: " in out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_fmt_keeps_the_meaning_of_valid_plans(text: str) -> None:
    assert format_source(text).text is not None  # valid headers: fmt never refuses
    assert_fmt_keeps_meaning(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_plans())
def test_fmt_keeps_the_meaning_of_mutated_plans(text: str) -> None:
    check_text(text)  # never raises
    assert_fmt_keeps_meaning(text)


def test_fmt_keeps_the_size_of_a_folded_run() -> None:
    """fmt sorts `16, 0..17, 0..16, 0..16`, so the first five out-of-range indices
    that `cap_repeats` lists change (16, 17 ... becomes 16, 16 ...); the run's
    total does not (found by the property above)."""
    text = (
        'plan 1\nmodel "qwen2moe-tiny" {\n  arch qwen2_moe\n'
        "  layers 6  hidden 256  ffn 512  vocab 8192  tied true\n"
        "  heads 8  kv_heads 2  head_dim 32\n"
        "  experts 16  top_k 2  expert_ffn 128  shared_ffn 256  expert_groups 4\n"
        '  qkv_bias true\n  dense_layers 5\n  fingerprint "sha256:0000"\n}\n\n'
        "moe layers 0..6, 6, 6 drop experts 16, 0..17, 0..16, 0..16\n"
    )
    formatted = format_source(text).text
    assert formatted is not None and "drop experts 0..16, 0..16, 0..17, 16" in formatted
    assert problems(check_text(formatted)) == problems(check_text(text))
    assert ("P104", "7 in one statement") in problems(check_text(text))
    assert_fmt_keeps_meaning(text)


def test_fmt_keeps_the_verdict_on_conflicting_widths() -> None:
    """Two `mlp` decisions for layer 1, one with `compensate` (a bias of 576 more):
    which one counts depends on the order, which fmt changes, so W006 gives no
    parameter verdict while P105 stands (found by the property above)."""
    text = (
        'plan 1\nmodel "SmolLM2-135M-Instruct" {\n  arch llama\n'
        "  layers 30  hidden 576  ffn 1536  vocab 49152  tied true\n"
        '  heads 9  kv_heads 3  head_dim 64\n  fingerprint "sha256:0000"\n}\n\n'
        "mlp layers 0..6 width 1 compensate\ndrop layers 7..20\nmlp layers 0, 1 width 1\n"
    )
    formatted = format_source(text).text
    assert formatted is not None
    assert formatted.index("0..1 width 1\n") < formatted.index("0..6 width 1 compensate")
    codes = {code for code, _ in problems(check_text(text))}
    assert "P105" in codes and "W006" not in codes
    assert_fmt_keeps_meaning(text)
    # Without the conflict the parameter verdict is given.
    single = text.replace("mlp layers 0, 1 width 1\n", "")
    assert "W006" in {code for code, _ in problems(check_text(single))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_plans(), plans()))
def test_cli_never_raises(text: str) -> None:
    assert_cli_survives(text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_plans(), plans()), mutated_plans())
def test_diff_of_two_plans_never_raises(old_text: str, new_text: str) -> None:
    """diff resolves plans with errors (issue 33): whatever they say, an exit status,
    2 exactly when a plan has no model to resolve against, never an exception."""
    with plan_file(old_text, "old.prn") as old, plan_file(new_text, "new.prn") as new:
        results = [check_text(p.read_text(encoding="utf-8")) for p in (old, new)]
        code, out, err = cli("diff", str(old), str(new))
        if any(resolve_anyway(r) is None for r in results):
            assert (code, out) == (2, "") and "nothing to compare" in err
        else:
            assert code in (0, 1) and err == ""
            assert code == 1 or all(r.ok for r in results)
            for path, r in zip((old, new), results, strict=True):
                heading = rf"^{re.escape(str(path))} (no longer checks|does not check): "
                assert bool(re.search(heading, out, re.M)) == (not r.ok)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_survive_the_cli(path: Path) -> None:
    assert_fmt_keeps_meaning(path.read_text(encoding="utf-8"))
    assert_cli_survives(path.read_text(encoding="utf-8"))
