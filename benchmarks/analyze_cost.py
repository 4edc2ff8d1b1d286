"""What `plangen analyze` costs, in memory and one decoder layer at a time (issue 36).

On a model that fits (default: the SmolLM2-135M demo checkpoint), in one run:

- a plain forward pass over the calibration set (`plangen.heldout.mean_loss` on
  the loaded model over the calibration windows `analyze` reads: 32 x 512, or its
  `--nsamples` x `--seqlen` when given), three times in fresh processes: the median
  is the unit of the "passes" columns;
- `plangen analyze MODEL --json` with the options given (default: none, i.e.
  `auto` at --target-params 0.75), in memory and with `--offload` (and with
  `--offload DIR` when `--disk` is given);

each in a fresh subprocess, its wall time, the passes it is worth (wall time /
the forward pass), the passes the planner counts (`forward_passes` of its
JSON), its phases, and its peak anonymous memory (RssAnon sampled every 2 ms;
the checkpoint is memory-mapped, so the high-water mark of RSS would count the
page cache). The plans (less their first line, which quotes the command) and
sidecars of every run are compared byte for byte.

`--synthetic LAYERS,HIDDEN,MLP,HEADS,KV_HEADS` runs it instead on a Llama checkpoint of
that shape with random bf16 weights (head size 64, vocabulary 49152, the SmolLM2 demo
tokenizer copied beside it; `benchmarks/layerwise_memory.py`'s writer), built under
`--dir` once and reused: a model wider than SmolLM2 that still fits, to see how the cost
grows with the width (its plans mean nothing; its costs do).

Usage: python benchmarks/analyze_cost.py [--model DIR | --synthetic L,H,F,Q,KV [--dir DIR]]
           [--disk DIR] [--out FILE.md] [-- ANALYZE OPTIONS]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "plancc" / "SmolLM2-135M-Instruct"


def rss_anon(pid: int) -> int:
    """A process's anonymous resident memory in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class AnonPeak:
    """The peak RssAnon of a running process, sampled every 2 ms on a thread from now
    until it exits (`join` returns it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.peak = rss_anon(proc.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self.peak = max(self.peak, rss_anon(self.proc.pid))
            time.sleep(0.002)

    def join(self) -> int:
        self._thread.join()
        return self.peak


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RssAnon and stdout of a command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = AnonPeak(proc)
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    peak = sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak, out


FORWARD = """
import json, sys, time
import torch
from executor.loader import load
from plangen.heldout import mean_loss
from plangen.options import Options
from plangen.pipeline import calibration_windows
window = json.loads(sys.argv[2])  # nsamples / seqlen given to analyze, if any
opts = Options(model_dir=__import__("pathlib").Path(sys.argv[1]), output=None, **window)
opts = opts.resolved()
_, calib, _ = calibration_windows(opts)
model = load(opts.model_dir, "cpu", torch.float32)
started = time.perf_counter()
loss = mean_loss(model, calib, opts.batch_size, "cpu")
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "loss": loss, "windows": [len(calib), len(calib[0])]}))
"""


def calibration_window(analyze_options: list[str]) -> dict[str, int]:
    """`--nsamples` and `--seqlen` among analyze's options, so the unit pass reads the
    same calibration windows as analyze does."""
    found: dict[str, int] = {}
    for i, opt in enumerate(analyze_options):
        for name in ("nsamples", "seqlen"):
            if opt == f"--{name}" and i + 1 < len(analyze_options):
                found[name] = int(analyze_options[i + 1])
            elif opt.startswith(f"--{name}="):
                found[name] = int(opt.partition("=")[2])
    return found


def forward_pass(
    model: Path, window: dict[str, int], runs: int = 3
) -> tuple[list[float], list[int]]:
    """Seconds of a plain forward pass over analyze's calibration windows, each in a
    fresh process (`runs` of them: one varied by 10% from run to run on the 2-core
    machine), and the windows' count x length."""
    seconds = []
    for _ in range(runs):
        _, _, out = timed([sys.executable, "-c", FORWARD, str(model), json.dumps(window)])
        result = json.loads(out)
        seconds.append(float(result["seconds"]))
    return seconds, result["windows"]


def analyze(model: Path, plan: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "plangen", "analyze", str(model), "-o", str(plan), "--force"]
    seconds, peak, out = timed([*cmd, "--json", *extra])
    result = json.loads(out)
    result.update(wall=seconds, peak_anon=peak, plan=plan)
    return result


def without_command(plan: Path) -> bytes:
    return plan.read_bytes().partition(b"\n")[2]


def sidecar(plan: Path) -> Path:
    return plan.with_name(plan.name.removesuffix(".prn") + ".scores.safetensors")


def synthetic(spec: str, root: Path) -> Path:
    """The checkpoint `--synthetic` names, written under root unless it is there."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from layerwise_memory import build, with_demo_tokenizer

    try:
        layers, hidden, ffn, heads, kv = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--synthetic {spec!r}: give LAYERS,HIDDEN,MLP,HEADS,KV_HEADS") from None
    if hidden != heads * 64 or heads % kv:
        raise SystemExit(f"--synthetic {spec!r}: HIDDEN must be HEADS x 64, HEADS a multiple of KV")
    shape = {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 64,
        "vocab_size": 49152,
    }
    out = build(root / spec.replace(",", "-"), layers, shape)
    with_demo_tokenizer(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--synthetic", metavar="L,H,F,Q,KV", help="a random Llama of this shape")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/plancc-cost"), help="its home")
    parser.add_argument("--disk", type=Path, help="also run with --offload DIR (states on disk)")
    parser.add_argument("--out", type=Path, help="write the table here as Markdown")
    parser.add_argument("analyze", nargs="*", help="options for plangen analyze (after --)")
    args = parser.parse_args()
    if args.synthetic:
        args.model = synthetic(args.synthetic, args.dir)
    units, windows = forward_pass(args.model, calibration_window(args.analyze))
    modes = [("in memory", []), ("--offload", ["--offload"])]
    if args.disk is not None:
        modes.append((f"--offload {args.disk}", ["--offload", str(args.disk)]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(modes):
            plan = Path(tmp) / f"run{i}" / "plan.prn"
            rows.append((name, analyze(args.model, plan, [*args.analyze, *flags])))
        first = rows[0][1]["plan"]
        same = all(
            without_command(r["plan"]) == without_command(first)
            and sidecar(r["plan"]).read_bytes() == sidecar(first).read_bytes()
            for _, r in rows
        )
    text = render(args, units, windows, rows, same)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


def render(
    args: argparse.Namespace, units: list[float], windows: list[int], rows: list, same: bool
) -> str:
    unit = statistics.median(units)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    options = " ".join(args.analyze) or "(defaults: auto, --target-params 0.75)"
    if args.synthetic:
        source = f" --synthetic {args.synthetic}"
    else:
        source = f" --model {args.model}" if args.model != DEFAULT_MODEL else ""
    lines = [
        "# What `plangen analyze` costs, in memory and layer by layer",
        "",
        f"Command: `python benchmarks/analyze_cost.py"
        f"{source}"
        f"{' --disk DIR' if args.disk else ''}"
        f"{' -- ' + ' '.join(args.analyze) if args.analyze else ''}`",
        f"Commit: {commit}; date: {datetime.date.today().isoformat()}; model: {args.model.name}; "
        f"analyze options: {options}; CPU, {os.cpu_count()} cores, float32.",
        "",
        f"One plain forward pass over the {windows[0]} x {windows[1]} calibration windows: "
        f"{unit:.1f} s, the median of {', '.join(f'{u:.1f}' for u in units)} "
        "(the unit of the passes columns).",
        "",
        "| run | wall s | passes (wall / forward) | passes counted | peak RssAnon GB | phases s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_s"].items())
        lines.append(
            f"| {name} | {r['wall']:.0f} | {r['wall'] / unit:.1f} | {r['forward_passes']:.1f} "
            f"| {r['peak_anon'] / 1e9:.2f} | {phases} |"
        )
    ratio = rows[1][1]["wall"] / rows[0][1]["wall"]
    lines += [
        "",
        f"Layer by layer / in memory: {ratio:.2f} x the wall time. Plans (less the line "
        f"quoting the command) and sidecars byte-identical across the runs: {same}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
