"""What `plangen.reconstruct.obs_ranking` costs: time and memory beside its inputs.

The OBS ranking of an MLP's channels is the default plan's (`auto` ranks every
reconstructed MLP with it, twice: the judge's one-shot solves and the winner's
walk). For each size, in a fresh subprocess: a synthetic float64 Gram G = D + B B^T
(n x n, B of rank 64, D a positive diagonal: cheap to build at an 8B's width) and a
random weight (out x n); then `obs_ranking(weight, G, DAMP, width=n // 2)` (the
rounds stop once half the columns are decided, as `auto`'s narrowest candidate has
them), timed, with the process's RssAnon sampled every 2 ms. Reported: the seconds
and the peak RssAnon above what the inputs held before the call.

Usage: python benchmarks/obs_cost.py [--sizes 1536x576,14336x4096] [--out FILE.md]
(sizes as n x out: SmolLM2's MLP, Llama-3-8B's MLP).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from analyze_cost import AnonPeak, rss_anon  # noqa: E402 - a sibling script

CHILD = """
import json, sys, time, torch
from plangen.reconstruct import obs_ranking
from plangen.metrics import DAMP
n, out = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
b = torch.randn(n, 64, generator=g, dtype=torch.float64)
gram = b @ b.T
gram.diagonal().add_(torch.rand(n, generator=g, dtype=torch.float64) + 0.1)
weight = torch.randn(out, n, generator=g)
del b
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
obs_ranking(weight, gram, DAMP, width=n // 2)
print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
"""


def measure(n: int, out: int) -> tuple[float, int]:
    """Seconds of one ranking and its peak RssAnon above the inputs'."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", CHILD, str(n), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the child for n={n} failed")
    base = rss_anon(proc.pid)
    sampler = AnonPeak(proc)
    proc.stdin.write("\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.wait()
    return float(result["seconds"]), sampler.join() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1536x576,14336x4096", help="n x out, comma-separated")
    parser.add_argument("--out", type=Path, help="write the table here as Markdown")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "Command: `python benchmarks/obs_cost.py " + " ".join(sys.argv[1:]) + "`",
        f"Commit: {commit}; date: {datetime.date.today()}; CPU, {os.cpu_count()} cores, float64.",
        "",
        "| n (columns) x out | width | seconds | peak RssAnon above the inputs |",
        "|---|---|---|---|",
    ]
    for size in args.sizes.split(","):
        n, out = (int(v) for v in size.lower().split("x"))
        seconds, extra = measure(n, out)
        lines.append(f"| {n} x {out} | {n // 2} | {seconds:.2f} | {extra / 2**30:.2f} GB |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
