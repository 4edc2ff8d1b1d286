"""How long `plancc check` takes on a Llama-3-70B-shaped plan (no weights).

Prints a table: wall time of a cold `plancc check` process and of the
in-process pipeline (parse → passes → resolve → cost report), best of N runs.
Usage: python benchmarks/check_70b.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN = """\
plan 1
model "Llama-3-70B" {
  arch llama
  layers 80  hidden 8192  ffn 28672  vocab 128256  tied false
  heads 64  kv_heads 8  head_dim 128
  fingerprint "sha256:0000000000000000000000000000000000000000000000000000000000000000"
}

keep layers 0..3, 79
drop layers 60..71  # angular distance 0.09
bundle B layers 60..65
bundle C layers 66..71

attn layers 20..59 drop groups 3, 7
mlp layers 4..59 width 22528
mlp layers 72..78 width 24576
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from compiler.check import check_text
    from compiler.report import render_report

    # A uniform plan makes check build transformers' LlamaConfig (stock loadability).
    uniform = PLAN.split("\nattn")[0] + "\n"
    cold, cold_uniform, first_uniform = [], [], []
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as empty:
        runs = (
            (PLAN, cold, args.runs, {}),
            (uniform, cold_uniform, args.runs, {}),
            # An empty cache: the config class is imported (with torch) and built.
            (uniform, first_uniform, 1, {"PLANCC_CACHE": empty}),
        )
        for text, times, n, env in runs:
            path = Path(tmp) / "llama70b.prn"
            path.write_text(text)
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(
                    [Path(sys.executable).parent / "plancc", "check", str(path)],
                    check=True,
                    capture_output=True,
                    env={**os.environ, **env},
                )
                times.append(time.perf_counter() - t0)
    warm = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        result = check_text(PLAN)
        assert result.resolved is not None
        render_report(result.resolved)
        warm.append(time.perf_counter() - t0)
    print(f"{'what':<44}{'best s':>10}{'median s':>10}")
    for name, times in (
        ("plancc check, heterogeneous (new process)", cold),
        ("plancc check, uniform (new process)", cold_uniform),
        ("plancc check, uniform, empty cache", first_uniform),
        ("check_text + cost report (in process)", warm),
    ):
        times.sort()
        print(f"{name:<44}{times[0]:>10.3f}{times[len(times) // 2]:>10.3f}")


if __name__ == "__main__":
    main()
