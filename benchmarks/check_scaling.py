"""How `check_text` time grows with the size of one selection (it should be linear).

For each statement kind, builds a plan whose selection has 1k, 2k, 4k, 8k and
16k comma-separated indices and times `compiler.check.check_text` in process
(best of N runs). Prints the seconds and the time per index relative to the
smallest size: about 1.0 all the way down means linear growth (a quadratic
pass would double it at each step). Indices beyond the model make one
diagnostic each, folded into `... and N more` after the first five.
`--long` runs 10k, 30k and 100k indices instead (issue 33: a 267 KB plan of
one repeated index); results are kept in benchmarks/results/.
Usage: python benchmarks/check_scaling.py [--runs 3] [--sizes 1000,2000,4000,8000,16000]
       python benchmarks/check_scaling.py --long
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

HEADER = """\
plan 1
model "wide" {{
  arch qwen2_moe
  layers {layers}  hidden 256  ffn 512  vocab 8192  tied true
  heads {heads}  kv_heads {kv}  head_dim 32
  experts {experts}  top_k 2  expert_ffn 128  shared_ffn 256
  fingerprint "sha256:0000"
}}
"""


def header(layers: int = 4096, heads: int = 8, kv: int = 2, experts: int = 16) -> str:
    return HEADER.format(layers=layers, heads=heads, kv=kv, experts=experts)


def evens(n: int) -> str:
    return ", ".join(str(2 * i) for i in range(n))


def repeats(n: int) -> str:
    return ", ".join(str(i % 100) for i in range(n))


# kind -> plan with an n-index selection
KINDS: dict[str, Callable[[int], str]] = {
    "drop layers 1, 1, 1, ...": lambda n: (
        header(layers=30) + f"drop layers {', '.join(['1'] * n)}\n"
    ),
    "drop layers (out of range)": lambda n: header() + f"drop layers {evens(n)}\n",
    "keep layers (repeated)": lambda n: header() + f"keep layers {repeats(n)}\n",
    "bundle (repeated)": lambda n: header() + f"drop layers 0..99\nbundle B layers {repeats(n)}\n",
    "attn drop groups": lambda n: (
        header(layers=8, heads=65536, kv=65536) + f"attn layers 0..3 drop groups {evens(n)}\n"
    ),
    "moe drop experts": lambda n: (
        header(layers=8, experts=65536) + f"moe layers 0..3 drop experts {evens(n)}\n"
    ),
    "mlp layers (odd layers)": lambda n: (
        header(layers=4096, experts=16)
        .replace("  experts 16  top_k 2  expert_ffn 128  shared_ffn 256\n", "")
        .replace("qwen2_moe", "llama")
        + "mlp layers "
        + ", ".join(str((2 * i + 1) % 4096) for i in range(n))
        + " width 256\n"
    ),
}


def best_of(runs: int, text: str) -> tuple[float, int]:
    from compiler.check import check_text

    times, count = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        result = check_text(text)
        times.append(time.perf_counter() - t0)
        count = len(result.diagnostics)
    return min(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="1000,2000,4000,8000,16000")
    parser.add_argument("--long", action="store_true", help="sizes 10000,30000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in ("10000,30000,100000" if args.long else args.sizes).split(",")]
    best_of(1, KINDS["drop layers (out of range)"](10))  # build the parser once
    print(f"{'statement':<28}{'indices':>9}{'best s':>9}{'per index':>11}{'diagnostics':>13}")
    for kind, make in KINDS.items():
        base = None
        for n in sizes:
            seconds, count = best_of(args.runs, make(n))
            per = seconds / n
            base = base or per
            print(f"{kind:<28}{n:>9,}{seconds:>9.3f}{per / base:>10.2f}x{count:>13}")


if __name__ == "__main__":
    main()
