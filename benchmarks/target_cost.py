"""What aiming `plangen analyze` at a serving target costs, on SmolLM2-135M-Instruct.

Protocol (the planner benchmarks'): builtin corpus, 32 calibration windows of 512
tokens, fp32, perplexity on the first 24 evaluation windows (`plancc eval --limit
24`), no healing. The default `auto` plan at `--target-params` (default 0.75, i.e.
-25%) is written once with no target; then, re-using its sidecar (`--scores`, so
the calibration is the same and only the candidates and their reconstruction walk
differ), once per target. Each plan is checked against its target, applied and
evaluated. The table gives parameters, perplexity and its change against the
untargeted plan, and the MLP widths the plan chose.

Usage: python benchmarks/target_cost.py [--model DIR] [--targets vllm llamacpp]
       [--target-params 0.75] [--out /tmp/plancc-target-cost]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from pathlib import Path


def analyze(model: Path, plan: Path, keep: float, *extra: str) -> float:
    from plangen.cli import main as plangen

    start = time.perf_counter()
    code = plangen(["analyze", str(model), "-o", str(plan), "--target-params", str(keep), *extra])
    if code != 0:
        raise SystemExit(f"plangen analyze {' '.join(extra)} exited {code}")
    return time.perf_counter() - start


def widths(plan: Path) -> str:
    found = [int(w) for w in re.findall(r"^mlp layers .* width (\d+)", plan.read_text(), re.M)]
    return f"{min(found)}..{max(found)} ({len(found)} statements)" if found else "-"


def main() -> None:
    from compiler.check import check_file
    from executor.apply import apply_plan
    from executor.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.path.expanduser("~/.cache/plancc/SmolLM2-135M-Instruct"))
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--targets", nargs="+", default=["vllm", "llamacpp"])
    parser.add_argument("--target-params", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-target-cost"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base = args.out / "any" / "plan.prn"
    seconds = {"any": analyze(args.model, base, args.target_params, "--quiet")}
    sidecar = base.with_name("plan.scores.safetensors")
    for target in args.targets:
        plan = args.out / target / "plan.prn"
        seconds[target] = analyze(
            args.model,
            plan,
            args.target_params,
            "--quiet",
            "--scores",
            str(sidecar),
            "--target",
            target,
        )
    original = evaluate(args.model, limit=24, progress=False, new_tokens=1)
    print(f"original: {original.params:,} parameters, perplexity {original.perplexity:.2f}")
    print(
        f"{'target':<10}{'params':>14}{'ppl':>9}{'Δ vs any':>10}{'check':>8}"
        f"{'analyze s':>11}  MLP widths"
    )
    reference = None
    for target in ["any", *args.targets]:
        plan = args.out / target / "plan.prn"
        result = check_file(plan, target=target)
        errors = [d for d in result.diagnostics if d.severity == "error"]
        out = args.out / target / "out"
        apply_plan(plan, out)
        ev = evaluate(out / "A", limit=24, progress=False, new_tokens=1)
        reference = reference or ev.perplexity
        change = f"{(ev.perplexity - reference) / reference * 100:+.1f}%"
        print(
            f"{target:<10}{ev.params:>14,}{ev.perplexity:>9.2f}{change:>10}"
            f"{'clean' if not errors else len(errors):>8}{seconds[target]:>11.0f}  {widths(plan)}"
        )


if __name__ == "__main__":
    main()
