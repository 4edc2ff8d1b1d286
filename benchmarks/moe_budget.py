"""`--target-params` on a trained Qwen2-MoE: one budget over expert drops and width.

Protocol (issue 13's): `../shared/fixtures/qwen2moe-tiny`, 32 x 512 calibration
tokens from the start of the builtin corpus's calibration pool, fp32,
perplexity of the applied result A (`plancc apply`, `plancc eval --limit 24`)
on the first 24 evaluation windows of 512, and on a text the planner never saw
(`--unseen`), no healing. At each parameter target three plans of the same
pipeline (held-out judge, allocation by measured loss) are compared:

* drops only: `--drop-experts`, the fewest experts per layer that reach the
  target (so it removes a little more than asked);
* width only: `--shrink-experts`, the fraction of every expert's channels that
  reaches it;
* the budget: `--target-params`, which builds the splits between the two at the
  target and writes the best by held-out loss.

Usage: python benchmarks/moe_budget.py [--model DIR] [--unseen FILE] [--targets 0.75,0.625]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen2moe-tiny"


def main() -> None:
    from compiler.checkpoint import load_checkpoint_facts
    from executor.apply import apply_plan
    from executor.evaluate import evaluate
    from plangen.analyze import model_facts, run
    from plangen.candidate import Candidate, original_params
    from plangen.options import Options
    from plangen.strategies.moe_budget import drops_for, narrowed_to

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURE)
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-moe-budget"))
    parser.add_argument("--unseen", type=Path, help="a UTF-8 text the planner never saw")
    parser.add_argument("--targets", default="0.75,0.625", help="kept fractions, comma-separated")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    facts = model_facts(load_checkpoint_facts(args.model))
    total = original_params(facts)
    n = facts.experts or 1
    data = ["builtin"] + ([str(args.unseen)] if args.unseen else [])

    def measured(name: str, opts: Options) -> tuple[str, float, list[float], float, str]:
        t0 = time.perf_counter()
        outcome = run(opts)
        took = time.perf_counter() - t0
        out = opts.output.with_suffix("")
        apply_plan(opts.output, out)
        got = [
            evaluate(out / "A", data=d, limit=24, progress=False, new_tokens=1).perplexity
            for d in data
        ]
        kept = outcome.chosen.params / total
        return name, kept, got, took, outcome.chosen.candidate.label

    head = f"{'target':>6}  {'plan':<44} {'kept':>6} {'ppl':>7}"
    print(head + (f" {'unseen':>8}" if args.unseen else "") + f" {'time':>6}  chosen", flush=True)
    for target in (float(t) for t in args.targets.split(",")):
        keep = round(total * target)
        drops = drops_for(facts, keep)
        width = narrowed_to(facts, Candidate("experts", ""), keep, "wanda", shared=False)
        assert width is not None and width.expert_width is not None
        shrink = 1 - width.expert_width / (facts.expert_ffn or 1)
        plan = args.out / f"t{target}"
        cases = [
            (f"drops only (--drop-experts {drops}/{facts.experts})", {"drop_experts": drops / n}),
            (f"width only (--shrink-experts {shrink:.3f})", {"shrink_experts": shrink}),
            (f"budget (--target-params {target})", {"target_params": target}),
        ]
        for i, (name, kw) in enumerate(cases):
            opts = Options(args.model, plan.with_name(f"{plan.name}-{i}.prn"), quiet=True, **kw)
            name, kept, got, took, label = measured(name, opts)
            cells = f"{target:>6}  {name:<44} {kept:>6.1%} {got[0]:>7.2f}"
            cells += f" {got[1]:>8.2f}" if args.unseen else ""
            print(cells + f" {took:>5.0f}s  {label}", flush=True)


if __name__ == "__main__":
    main()
