"""Aim candidates at a serving target: every candidate the planner judges runs there.

`plangen analyze --target NAME` keeps the planner inside one row of the
compiler's target table (`compiler.targets`): a candidate is brought into the
target's rules where that costs nothing but precision, and left out (with the
reason, so the plan's comment can say why) where it cannot be:

- `compensate` adds o_proj/down_proj biases; a target without them gets the
  same cuts uncompensated;
- MLP widths are rounded to the target's granularity (vLLM's `ffn_mult` can
  only say multiples of 256), down first, then whole steps are given back to
  the layers that lost most by rounding, as long as the candidate still
  removes what it removed before (or the budget, if that is less): the budget
  stays met and no layer is cut deeper than the rounding needs;
- anything else the target cannot run (KV groups that differ across layers
  where the query-head count is global, layers of different shape where one
  config describes them all, a family the target does not run) cannot be
  rounded away: such a candidate is left out, with the target table's reason.

Rounding moves every width by less than one step, so the candidate stays what
its strategy chose; the held-out judge then measures the rounded one, so what
is chosen is what runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from compiler import cost
from compiler.facts import ModelFacts
from compiler.targets import TARGETS, verdict
from plangen.candidate import Candidate
from plangen.strategies import Budget


@dataclass(frozen=True)
class Aimed:
    """A candidate brought into the target's rules, or None with the reason."""

    candidate: Candidate | None
    reason: str = ""


def removed_params(cand: Candidate, facts: ModelFacts) -> int:
    """Parameters the candidate removes, by the compiler's cost model."""
    base = cost.cost(cost.original(facts)).params
    return base - cost.cost(cand.resolved(facts)).params


def round_widths(
    widths: Mapping[int, int], ffn: int, step: int, spare: int, channel_cost: int
) -> dict[int, int]:
    """Widths in multiples of `step` (at least one step, at most `ffn`).

    Every width is rounded down first (more is removed); then a layer that was
    rounded down may be rounded up instead (one step back), the layers rounded
    down the most first (ties: the lower layer), while
    the parameters given back stay within what rounding down removed plus `spare`
    (what the candidate removed beyond its budget). A layer back at `ffn` is no
    longer narrowed and is left out of the result.
    """
    down = {i: max(step, w // step * step) for i, w in widths.items()}
    given = sum((down[i] - w) * channel_cost for i, w in widths.items())  # < 0 usually
    room = spare - given  # parameters that may still be given back
    order = sorted(widths, key=lambda i: (-(widths[i] - down[i]), i))
    for i in order:
        if down[i] < widths[i] and down[i] + step <= ffn and step * channel_cost <= room:
            down[i] += step
            room -= step * channel_cost
    return {i: w for i, w in down.items() if w < ffn}


def aim(cand: Candidate, target: str, facts: ModelFacts, budget: Budget | None) -> Aimed:
    """`cand` inside `target`'s rules (see the module docstring), or why it cannot be.

    Widths are rounded where a dense `budget` is given (a MoE candidate's shapes
    are its expert counts, which no target rounds). The adjusted candidate is
    judged by the target table itself
    (`compiler.targets.verdict`), so the planner and `plancc check --target` can
    never disagree about what runs.
    """
    t = TARGETS[target]
    if cand.compensate and not t.output_biases:
        label = cand.label.replace(", compensated", "")
        cand = dataclasses.replace(cand, compensate=False, label=f"{label}, uncompensated")
    step = t.ffn_multiple
    if budget is not None and step > 1 and any(w % step for w in cand.mlp_width.values()):
        before = removed_params(cand, facts)
        spare = max(0, before - budget.remove)
        widths = round_widths(cand.mlp_width, budget.ffn, step, spare, budget.channel_cost)
        cand = dataclasses.replace(
            cand, mlp_width=widths, label=f"{cand.label}, widths in multiples of {step}"
        )
        if removed_params(cand, facts) < min(before, budget.remove):
            return Aimed(None, f"the budget cannot be met with widths in multiples of {step}")
    judged = verdict(cand.resolved(facts), target)
    return Aimed(cand) if judged.runs else Aimed(None, judged.reason)
