"""The compiler pipeline: parse → IR → fact validation → passes → resolved plan.

`check_text` is what `plancc check`, `plancc diff` and the executor call. It
never raises on a bad plan: every problem becomes a diagnostic, and the
resolved plan is produced only when the plan itself has no error. With a
serving `target`, that target's rules (`compiler.targets`) are checked on the
resolved plan and each broken one is a located error too; the resolved plan
is kept then, so the cost report can still say where the result does run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler import ir
from compiler.diagnostics import Diagnostic, cap_repeats, error, sort_diagnostics
from compiler.facts import ModelFacts, validate_facts
from compiler.parse import gc_paused, parse
from compiler.passes import PASSES, Context
from compiler.resolve import ResolvedPlan, resolve
from compiler.targets import ANY, target_diagnostics


@dataclass(frozen=True)
class CheckResult:
    source: str
    plan: ir.Plan | None
    facts: ModelFacts | None
    diagnostics: tuple[Diagnostic, ...]
    resolved: ResolvedPlan | None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors


def check_text(
    text: str,
    base_dir: Path | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    target: str = ANY,
) -> CheckResult:
    """Check plan text. `checkpoint`: facts read from the real model (`--model`);
    `target`: a serving target whose rules are errors (`any`: none)."""
    with gc_paused():
        return _check_text(text, base_dir, checkpoint, target)


def _check_text(
    text: str, base_dir: Path | None, checkpoint: Mapping[str, Any] | None, target: str
) -> CheckResult:
    parsed = parse(text)
    diags = list(parsed.diagnostics)
    plan = parsed.plan
    if plan is None or plan.model is None:
        return CheckResult(text, plan, None, tuple(_final(diags)), None)
    facts, fact_diags = validate_facts(plan.model)
    diags += fact_diags
    if checkpoint is not None:
        diags += compare_with_checkpoint(plan.model, checkpoint)
    if facts.layers is not None:
        ctx = Context(plan, facts, base_dir)
        for _name, run in PASSES:
            diags += run(ctx)
    diags = _final(diags)
    resolved = None
    if facts.layers is not None and not any(d.is_error for d in diags):
        resolved = resolve(plan, facts)
        diags = _final(diags + target_diagnostics(resolved, target, plan))
    return CheckResult(text, plan, facts, tuple(diags), resolved)


def resolve_anyway(result: CheckResult) -> ResolvedPlan | None:
    """The per-layer decisions a plan states, even when it has errors (`plancc diff`).

    A reviewer comparing an edited plan needs to see what the edit changed
    before being told what no longer checks, so this resolves any plan that
    parsed and whose model block states a valid layer count. What resolving
    does with a wrong statement is plain: indices outside the model are
    ignored, a width is taken as written, and of two decisions for one layer
    the later one counts. Returns None when there is no model to resolve against.
    """
    if result.resolved is not None:
        return result.resolved
    if result.plan is None or result.facts is None or result.facts.layers is None:
        return None
    return resolve(result.plan, result.facts)


def _final(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Source order, duplicates dropped, long runs of one code in one statement folded."""
    return cap_repeats(sort_diagnostics(diags))


def check_file(
    path: Path, checkpoint: Mapping[str, Any] | None = None, target: str = ANY
) -> CheckResult:
    """Read and check a plan file (raises OSError/UnicodeDecodeError on I/O problems)."""
    text = path.read_text(encoding="utf-8")
    return check_text(text, base_dir=path.parent, checkpoint=checkpoint, target=target)


def compare_with_checkpoint(block: ir.ModelBlock, real: Mapping[str, Any]) -> list[Diagnostic]:
    """P130/P131: every fact the plan states must equal the checkpoint's.

    Facts the plan omits are not errors (the plan may state only what it
    needs); facts the checkpoint defines and the plan states differently are.
    """
    out = []
    for fact in block.facts:
        if fact.key not in real and fact.key not in ("fingerprint", "arch"):
            if isinstance(fact.value, bool) and fact.value is False:
                continue
            if fact.key == "dense_layers" or (isinstance(fact.value, bool)):
                out.append(
                    error(
                        "P130",
                        f"the plan says `{fact.key} {_show(fact.value)}`, the checkpoint "
                        "does not have it",
                        fact.span,
                    )
                )
            continue
        if fact.key not in real:
            continue
        want, have = real[fact.key], fact.value
        if isinstance(have, ir.Selection):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if isinstance(have, int) and not isinstance(have, bool) and fact.key == "dense_layers":
            have = (have,)
        if have != want and fact.key == "weights":
            out.append(
                error(
                    "P132",
                    f"the checkpoint's weights are not the ones the plan was measured on: "
                    f"plan {_show(fact.value)}, checkpoint {_show(real[fact.key])} (same "
                    "structure, other weights)",
                    fact.value_span,
                    "pass --model the checkpoint the plan was analyzed on, run `plangen "
                    "analyze` on this one, or delete the plan's `weights` line to apply its "
                    "decisions to these weights anyway",
                )
            )
        elif have != want:
            code = "P131" if fact.key == "fingerprint" else "P130"
            what = "fingerprint" if code == "P131" else f"`{fact.key}`"
            out.append(
                error(
                    code,
                    f"{what} disagrees with the checkpoint: plan {_show(fact.value)}, "
                    f"checkpoint {_show(real[fact.key])}",
                    fact.value_span,
                    "this plan was written for another model: regenerate the model block with "
                    "`plangen header MODEL_DIR`"
                    if code == "P131"
                    else "fix the fact, or check that --model points at the right checkpoint",
                )
            )
    stated = {f.key for f in block.facts}
    for key, value in real.items():
        if key == "dense_layers" and key not in stated:
            out.append(
                error(
                    "P130",
                    f"the checkpoint has dense (non-MoE) layers {_show(value)}, "
                    "which the model block does not state",
                    block.span,
                    f"add `dense_layers {_show(value)}`",
                )
            )
        elif isinstance(value, bool) and value and key != "tied" and key not in stated:
            out.append(
                error(
                    "P130",
                    f"the checkpoint has `{key} true`, which the model block does not state",
                    block.span,
                    f"add `{key} true` to the model block",
                )
            )
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return str(ir.Selection.from_ints(list(value)))
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
