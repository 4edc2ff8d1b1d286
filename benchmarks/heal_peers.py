"""`plancc heal` on SmolLM2-135M-Instruct against the peers' healed figures (issue 14).

Protocol (the peers' budget): LoRA r=8, alpha 16, dropout 0.05 on q/k/v/o/gate/
up/down; AdamW (the peers: 2e-4; `--lr`, default plancc's 1e-3), 3 warm-up steps
then linear decay; batch 1 x 8 accumulation; 2 epochs over the 132 windows of
512 of the builtin calibration pool (135,168 tokens); fp32; perplexity on the
first 24 evaluation windows of 512 (and of a text never seen, `--unseen`). Rows:

* `default`: `plangen analyze --target-params 0.75` (the default plan), applied,
  healed with LoRA; `teacher`: the same with `--teacher original`
  (distillation mixed with the LM loss by the default `--kd-weight`) at equal steps;
* `peer`: the issue's best peer, Wanda-sp MLP-only -25% with least-squares
  `down_proj` reconstruction (damp 1e-2), reproduced and healed at the same `--lr`;
* `depth`: 9 layers dropped by block influence in two bundles (`--strategy
  depth --drop 9 --split half`), healed staged A -> A+B -> A+B+C.

Usage: python benchmarks/heal_peers.py [--unseen FILE] [--parts default,teacher,peer,depth]
       [--lr 1e-3] [--epochs 2] [--max-windows N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from planner_peers import RECONSTRUCTION  # the peers' planner settings, one place

PEER = "Wanda-sp, MLP only + reconstruction"  # issue 14's best healed peer

PEERS = {  # model -> (before healing, after LoRA), issue 14
    "original": (13.86, 11.62),
    "FLAP -25%": (31.39, 22.72),
    "ShortGPT 9 layers (-23.7%)": (55.50, 33.86),
    "Wanda-sp MLP-only -25% + least-squares reconstruction": (18.15, 15.16),
}


def main() -> None:
    from executor.apply import apply_plan
    from executor.evaluate import evaluate
    from heal.options import HealOptions
    from heal.stages import heal
    from plangen.analyze import run
    from plangen.demo import demo_model_dir
    from plangen.options import Options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo_model_dir())
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-heal"))
    parser.add_argument("--unseen", type=Path, help="a UTF-8 text never trained or planned on")
    parser.add_argument("--parts", default="default,teacher,peer,depth")
    parser.add_argument("--lr", type=float, default=HealOptions.lr)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="reuse plans and outputs in --out")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = ["builtin"] + ([str(args.unseen)] if args.unseen else [])

    def ppl(path: Path) -> list[float]:
        return [
            evaluate(
                path, data=d, limit=24, device=args.device, progress=False, new_tokens=1
            ).perplexity
            for d in texts
        ]

    def pruned(name: str, **kw) -> Path:
        plan, out = args.out / f"{name}.prn", args.out / name
        if not (out / "A").is_dir():
            run(Options(args.model, plan, quiet=True, device=args.device, **kw))
            apply_plan(plan, out)
        return out

    def healed(out: Path, name: str, **kw) -> tuple[Path, float]:
        dest = args.out / name
        t0 = time.perf_counter()
        if not dest.is_dir():
            opts = HealOptions(
                out,
                dest,
                epochs=args.epochs,
                lr=args.lr,
                max_windows=args.max_windows,
                device=args.device,
                eval_limit=0,
                progress=False,
                **kw,
            )
            heal(opts)
        return dest, time.perf_counter() - t0

    rows: list[tuple[str, list[float], list[float], str]] = []

    def healed_a(label: str, out: Path, before: list[float], name: str, **kw) -> None:
        """Heal stage A of `out` as `name` and add its row."""
        dest, took = healed(out, name, **kw)
        rows.append((label, before, ppl(dest / "A"), _info(dest, "A", took)))

    rows.append(("original", ppl(args.model), [], ""))
    if parts & {"default", "teacher"}:
        out = pruned("default")
        before = ppl(out / "A")
        if "default" in parts:
            healed_a("plancc default -25%, LoRA", out, before, "default-lora")
        if "teacher" in parts:
            healed_a(
                "plancc default -25%, LoRA + --teacher original",
                out,
                before,
                "default-kd",
                teacher="original",
            )
    if "peer" in parts:
        out = pruned("peer", **dict(RECONSTRUCTION)[PEER])
        healed_a(f"{PEER} -25% (reproduced), LoRA", out, ppl(out / "A"), "peer-lora")
    if "depth" in parts:
        out = pruned("depth", strategy="depth", drop=9, split=0.5)
        dest, took = healed(out, "depth-staged", stages=("A", "B", "C"))
        from executor.restore import restore

        for stage in ("A", "B", "C"):
            unhealed = out / "A"
            if stage != "A":
                unhealed = args.out / f"depth-{stage}"
                if not unhealed.is_dir():
                    restore(out, stage, unhealed)
            rows.append(
                (
                    f"depth 9 layers, staged: {stage}",
                    ppl(unhealed),
                    ppl(dest / stage),
                    _info(dest, stage, took),
                )
            )

    print(f"{args.model.name}: 24 evaluation windows of 512; epochs {args.epochs}, lr {args.lr:g}")
    head = f"{'model':<52} {'before':>8} {'healed':>8}"
    if args.unseen:
        head += f" {'unseen':>8} {'healed':>8}"
    print(head + "  training")
    for name, before, after, info in rows:
        cells = f"{name:<52} {before[0]:>8.2f} {after[0] if after else float('nan'):>8.2f}"
        if args.unseen:
            cells += f" {before[1]:>8.2f} {after[1] if after else float('nan'):>8.2f}"
        print(cells + f"  {info}")
    print("peers (issue 14):")
    for name, (before, after) in PEERS.items():
        print(f"  {name:<52} {before:>8.2f} {after:>8.2f}")


def _info(dest: Path, stage: str, took: float) -> str:
    record = json.loads((dest / stage / "heal.json").read_text())
    return (
        f"{record['steps']} steps, {record['tokens']:,} tokens, "
        f"{record['tokens_per_second']:,.0f} tok/s, {took:.0f} s for the run"
    )


if __name__ == "__main__":
    main()
