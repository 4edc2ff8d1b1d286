"""plancc's planner against the peers on SmolLM2-135M-Instruct, one protocol.

Protocol (issue 11): builtin corpus, seqlen 512, 32 calibration windows from the
start of the calibration pool, fp32, perplexity on the first 24 evaluation
windows (`plancc eval --limit 24`), no healing. One `plangen analyze` run (the
default: every metric, gradients included) writes the sidecar; every row is
then built from those tables with the strategy that reproduces the peer's
shape, emitted as a plan, checked, applied with `plancc apply` and evaluated.
The last rows are plancc's own strategies and its default plan at each size.

It also measures what analyze costs in forward passes over the calibration
set: the wall time of `plangen analyze` (forward-only and gradient metrics)
divided by the time of one plain forward pass over the same windows.

Usage: python benchmarks/planner_peers.py [--model DIR] [--out /tmp/plancc-planner]
       [--unseen /tmp/licenses.txt /tmp/wheels.txt]   (built by benchmarks/unseen_texts.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import time
from pathlib import Path

PEERS = {  # (method, size) -> the peer's perplexity
    ("ShortGPT block influence (5 / 9 layers)", "12.5"): 26.08,
    ("ShortGPT block influence (5 / 9 layers)", "25"): 55.50,
    ("Gromov angular block (5 / 9 layers)", "12.5"): 103.3,
    ("Gromov angular block (5 / 9 layers)", "25"): 163.1,
    ("magnitude (Torch-Pruning), attention and MLP", "12.5"): 44165,
    ("magnitude (Torch-Pruning), attention and MLP", "25"): 494946,
    ("LLM-Pruner Taylor param_first, layers 4-27", "12.5"): 17.26,
    ("LLM-Pruner Taylor param_first, layers 4-27", "25"): 49.23,
    ("Wanda-sp, attention and MLP", "12.5"): 17.36,
    ("Wanda-sp, attention and MLP", "25"): 113.23,
    ("Wanda-sp, MLP only (888 channels)", "25"): 27.68,
    ("FLAP with bias compensation", "12.5"): 16.97,
    ("FLAP with bias compensation", "25"): 31.39,
    ("Taylor, MLP only (725 channels, layers 4-27)", "25"): 27.43,
    ("ShortGPT 3 layers + FLAP", "25"): 31.10,
    # issue 12's peers: least-squares down_proj reconstruction (sequential, damped 1e-2)
    ("Wanda-sp, MLP only + reconstruction", "12.5"): 15.07,
    ("Wanda-sp, MLP only + reconstruction", "25"): 18.15,
    ("Taylor, MLP only (layers 4-27) + reconstruction", "25"): 18.64,
}

# Reconstruction rows: (method, Options overrides), each planned from the default run's
# sidecar (`--scores`, no recalibration) with its own walk, plan and sidecar; the
# variants (`at_12_5` False) only at -25%, where the differences are largest.
RECONSTRUCTION = [
    (
        "Wanda-sp, MLP only + reconstruction",
        {
            "strategy": "uniform",
            "parts": "mlp",
            "metric": "wanda",
            "reconstruct": True,
            "damp": 1e-2,
        },
    ),
    (
        "Wanda-sp, MLP only + reconstruction, damp 1e-3",
        {
            "strategy": "uniform",
            "parts": "mlp",
            "metric": "wanda",
            "reconstruct": True,
            "damp": 1e-3,
            "at_12_5": False,
        },
    ),
    (
        "Wanda-sp, MLP only + reconstruction, one-shot",
        {
            "strategy": "uniform",
            "parts": "mlp",
            "metric": "wanda",
            "reconstruct": True,
            "reconstruct_mode": "one-shot",
            "damp": 1e-2,
            "at_12_5": False,
        },
    ),
    (
        "Taylor, MLP only (layers 4-27) + reconstruction",
        {
            "strategy": "uniform",
            "parts": "mlp",
            "metric": "taylor",
            "mlp_layers": "4..27",
            "reconstruct": True,
            "damp": 1e-2,
            "at_12_5": False,
        },
    ),
    (
        "plancc OBS channels, MLP only, uniform + reconstruction",
        {"strategy": "uniform", "parts": "mlp", "metric": "obs"},
    ),
    (
        "plancc global taylor, attention + MLP, bounded + reconstruction",
        {"strategy": "global", "metric": "taylor", "reconstruct": True},
    ),
    (
        "plancc global OBS channels, MLP, bounded + reconstruction",
        {"strategy": "global", "parts": "mlp", "metric": "obs"},
    ),
    (
        "... residual (down_proj fitted to the original model's layer output)",
        {
            "strategy": "global",
            "parts": "mlp",
            "metric": "obs",
            "reconstruct_mode": "residual",
            "at_12_5": False,
        },
    ),
]
KEEP = {"12.5": 0.875, "25": 0.75}


def rows(budget, layers: int) -> list:
    """(method, candidate) for one size, every shape built by plancc's strategies."""
    from plangen.candidate import Candidate
    from plangen.strategies.depth import depth
    from plangen.strategies.global_budget import TRUST_REGION, global_budget
    from plangen.strategies.unbalanced import unbalanced
    from plangen.strategies.uniform import uniform

    small = budget.keep_params > 0.8 * budget.total
    n_depth = 5 if small else 9
    every = list(range(layers))
    block = list(range(4, 28))
    out = [
        ("ShortGPT block influence (5 / 9 layers)", depth(budget, n_depth, "block_influence")),
        ("Gromov angular block (5 / 9 layers)", depth(budget, n_depth, "angular")),
        (
            "magnitude (Torch-Pruning), attention and MLP",
            uniform(budget, "magnitude", every, every),
        ),
        (
            "LLM-Pruner Taylor param_first, layers 4-27",
            uniform(budget, "taylor", block, block, round_groups="down"),
        ),
        ("Wanda-sp, attention and MLP", uniform(budget, "wanda", every, every)),
    ]
    if not small:
        out.append(("Wanda-sp, MLP only (888 channels)", uniform(budget, "wanda", [], every)))
    out.append(
        (
            "FLAP with bias compensation",
            global_budget(budget, "flap", None, "score", compensate=True),
        )
    )
    if not small:
        out.append(
            ("Taylor, MLP only (725 channels, layers 4-27)", uniform(budget, "taylor", [], block))
        )
        short = depth(budget, 3, "block_influence")
        rest = dataclasses.replace(budget, keep_params=budget.keep_params + 3 * budget.layer_cost)
        kept = [i for i in every if i not in short.drop]
        flap = global_budget(rest, "flap", kept, "score", compensate=True)
        combo = Candidate(
            "flap",
            "ShortGPT 3 layers + FLAP",
            drop=short.drop,
            groups_dropped=flap.groups_dropped,
            mlp_width=flap.mlp_width,
            metric="flap",
            compensate=True,
            notes=short.notes,
        )
        out.append(("ShortGPT 3 layers + FLAP", combo))
    out += [
        ("plancc unbalanced (taylor, inverse BI)", unbalanced(budget, "taylor")),
        ("plancc global (taylor per parameter)", global_budget(budget, "taylor")),
        (
            "plancc global (MLP, compensated, bounded)",
            global_budget(budget, "taylor", attention=False, compensate=True, trust=TRUST_REGION),
        ),
    ]
    return out


def main() -> None:
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from compiler.corpus import TokenPools, load_text, tokenize, windows
    from compiler.hashing import sha256_file
    from executor.apply import apply_plan
    from executor.evaluate import evaluate
    from executor.loader import load
    from plangen import emit
    from plangen.analyze import model_facts, run
    from plangen.options import Options
    from plangen.pipeline import calibration_line
    from plangen.scores import read_sidecar
    from plangen.strategies import Budget

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.path.expanduser("~/.cache/plancc/SmolLM2-135M-Instruct"))
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-planner"))
    parser.add_argument(
        "--unseen",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="UTF-8 text files the planner never saw (benchmarks/unseen_texts.py builds "
        "licenses.txt and wheels.txt): every row is also evaluated on each (its last 40%%, "
        "24 windows), one column per file",
    )
    parser.add_argument(
        "--cost-only", action="store_true", help="only measure what analyze costs (4 minutes)"
    )
    parser.add_argument(
        "--reconstruction-only",
        action="store_true",
        help="skip the issue-11 peer rows (unchanged by reconstruction): the default plans "
        "and the reconstruction rows only",
    )
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    ck = load_checkpoint_facts(args.model)
    facts = model_facts(ck)

    # One plain forward pass over the calibration windows: the unit of cost.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    text = load_text("builtin")
    pools = TokenPools.split(tokenize(text, tok), text)
    calib = windows(pools.calibration, 512, 32)
    model = load(args.model, "cpu", torch.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, 32, 4):
            model(input_ids=torch.tensor(calib[i : i + 4]), use_cache=False)
    forward_s = time.perf_counter() - t0
    del model

    results = {}
    cost_rows = []
    walk_rows: list[tuple[str, float]] = []  # seconds of one --scores re-plan with its walk
    for size, keep in KEEP.items():
        plan = args.out / f"default-{size}.prn"
        t0 = time.perf_counter()
        outcome = run(Options(args.model, plan, target_params=keep, quiet=True))
        took = time.perf_counter() - t0
        cost_rows.append((f"analyze default (gradients), -{size}%", took, took / forward_s))
        results[("plancc default (auto: best on held-out loss)", size)] = (
            plan,
            outcome.chosen.candidate.label,
        )
    plan = args.out / "flap-forward-only.prn"
    t0 = time.perf_counter()
    run(Options(args.model, plan, target_params=0.75, strategy="flap", quiet=True))
    took = time.perf_counter() - t0
    cost_rows.append(("analyze --strategy flap (forward only), -25%", took, took / forward_s))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.cost_only:
        _print_cost(forward_s, cost_rows, rss_mb)
        return

    sidecar = args.out / "default-25.scores.safetensors"
    scores = read_sidecar(sidecar)
    header = emit.Header(
        ck.model_block(),
        str(args.model),
        sidecar.name,
        sha256_file(sidecar),
        calibration_line(Options(args.model, plan)),
        ["benchmarks/planner_peers.py"],
    )
    layers = facts.layers or 0
    for size, keep in KEEP.items():
        budget = Budget.of(facts, scores, keep)
        for method, cand in [] if args.reconstruction_only else rows(budget, layers):
            path = args.out / f"{len(results):02d}.prn"
            path.write_text(emit.plan_text(cand, header, scores, facts.ffn or 0), encoding="utf-8")
            results[(method, size)] = (path, cand.label)
        for method, overrides in RECONSTRUCTION:
            if size == "12.5" and not overrides.get("at_12_5", True):
                continue
            overrides = {k: v for k, v in overrides.items() if k != "at_12_5"}
            path = args.out / f"{len(results):02d}.prn"
            opts = Options(
                args.model, path, target_params=keep, scores=sidecar, quiet=True, **overrides
            )
            t0 = time.perf_counter()
            run(opts)
            walk_rows.append((f"{method}, -{size}%", time.perf_counter() - t0))
            results[(method, size)] = (path, method)

    base = evaluate(args.model, limit=24, progress=False, new_tokens=1).perplexity
    print(f"SmolLM2-135M-Instruct, original perplexity {base:.2f} (first 24 evaluation windows)")
    originals = _unseen_perplexities(args.model, args.unseen)
    for text_path, ppl in zip(args.unseen, originals, strict=True):
        print(f"on {text_path} (never seen by the planner): original {ppl:.2f}")
    print(
        f"one forward pass over 32 x 512 calibration tokens: {forward_s:.1f} s; "
        f"peak RSS {rss_mb:.0f} MB\n"
    )
    print(
        f"{'method':<46} {'size':>6} {'params':>7} {'ppl':>9} {'peer':>9} {'ratio':>6} "
        f"{'apply s':>7}" + "".join(f" {p.stem[:9]:>9}" for p in args.unseen)
    )
    for (method, size), (path, _label) in sorted(
        results.items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        out = path.with_suffix("")
        t0 = time.perf_counter()
        apply_plan(path, out)
        applied_s = time.perf_counter() - t0
        ev = evaluate(out, limit=24, progress=False, new_tokens=1)
        unseen = "".join(f" {ppl:>9.2f}" for ppl in _unseen_perplexities(out, args.unseen))
        peer = PEERS.get((method, size))
        ratio = f"{ev.perplexity / peer:6.2f}" if peer else ""
        print(
            f"{method:<46} {'-' + size + '%':>6} {ev.params / 134_515_008:>7.1%} "
            f"{ev.perplexity:>9.2f} "
            f"{(f'{peer:,.2f}' if peer else ''):>9} {ratio:>6} {applied_s:>7.1f}{unseen}"
        )
        shutil.rmtree(out)
    _print_cost(forward_s, cost_rows, rss_mb)
    print("\nre-planning from the sidecar with one reconstruction walk (no calibration):")
    for what, took in walk_rows:
        print(f"  {what:<64} {took:6.1f} s  {took / forward_s:4.2f} passes")


def _unseen_perplexities(model: Path, texts: list[Path]) -> list[float]:
    """The benchmark's 24-window perplexity of one model on each unseen text."""
    from executor.evaluate import evaluate

    return [
        evaluate(model, data=str(t), limit=24, progress=False, new_tokens=1).perplexity
        for t in texts
    ]


def _print_cost(forward_s: float, rows: list[tuple[str, float, float]], rss_mb: float) -> None:
    print(
        f"\nanalyze cost (wall time / one plain forward pass over the 32 x 512 calibration "
        f"tokens, {forward_s:.1f} s; process peak RSS {rss_mb:.0f} MB):"
    )
    for what, took, ratio in rows:
        print(f"  {what:<48} {took:7.1f} s  {ratio:4.2f} passes")


if __name__ == "__main__":
    main()
