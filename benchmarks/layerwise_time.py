"""Time of the layer-wise walk and reverse sweep against the in-memory passes (issue 36).

On a model that fits (default: the SmolLM2-135M demo checkpoint), over
`--windows` calibration windows of `--tokens` tokens (the builtin corpus's
calibration pool, from its start, as `plangen analyze` reads it), in float32 on
the CPU, batches of `--batch-size`, one process, measured in one run:

- in-memory gradient pass: `from_pretrained`, then calibration's gradient loop
  (`plangen.calibrate.collect` without its statistics hooks): per batch the
  sliced next-token loss (`executor.lm_loss.next_token_loss`) and one backward,
  gradients of the layers' table weights (attention and dense MLP) summed in
  `.grad`; and the same with activation checkpointing (`--checkpointing`'s
  recompute, the in-memory counterpart of the sweep's);
- in-memory forward: `plangen.heldout.mean_loss` on the full model;
- layer-wise forward walk: `LayerWalk.open` then `run` + `loss`;
- layer-wise reverse sweep: `LayerWalk.open` then `backward_sweep` (forward
  walk keeping every boundary, head gradient, each layer reloaded, recomputed
  and back-propagated) with the same table weights, every layer's `.grad` read;

each layer-wise run with every layer read from the file as the walk reaches it
(`resident=False`) and with every layer loaded once by `open` (`resident=True`).
A run's time includes loading the weights (from_pretrained, open); the table
gives that load apart too. Each pass runs in a fresh subprocess (the layer-wise
walk fixes glibc's mmap threshold process-wide; nothing carries over), in
`--repeat` rounds of every pass, the fastest run of each kept (the 2 CPU cores
are shared). Ratios are to the first in-memory pass of the same kind.

Usage: python benchmarks/layerwise_time.py [--model DIR] [--windows 8] [--tokens 512]
           [--batch-size 4] [--repeat 1] [--threads N] [--passes grad,sweep,...]
           [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "plancc" / "SmolLM2-135M-Instruct"


def calibration_windows(model_dir: Path, count: int, tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from compiler import corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = corpus.builtin_text()
    pools = corpus.TokenPools.split(corpus.tokenize(text, tok), text)
    return corpus.windows(pools.calibration, tokens, limit=count)


def table_names(model_dir: Path) -> set[str]:
    """Layer-relative names of the weights calibration takes gradients of."""
    from compiler.checkpoint import load_checkpoint_facts

    arch = load_checkpoint_facts(model_dir).arch
    return {s.name for s in arch.attention + arch.dense_mlp}


# --------------------------------------------------------------------------- the passes


def in_memory_gradients(
    model_dir: Path, windows: list[list[int]], batch: int, checkpointing: bool
) -> tuple[float, float, float]:
    """(load s, pass s, loss): calibration's gradient loop on the full model."""
    import torch
    from transformers import AutoModelForCausalLM

    from executor import lm_loss

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    names = table_names(model_dir)
    layers = model.get_submodule("model.layers")
    wanted = {id(p) for layer in layers for n, p in layer.named_parameters() if n in names}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    if checkpointing:  # as plangen.calibrate does it
        model.activation_checkpointing_enable({"use_reentrant": False})
        for layer in layers:
            layer.training = True
    total, count = 0.0, 0
    for s in range(0, len(windows), batch):
        ids = torch.tensor(windows[s : s + batch])
        loss = lm_loss.next_token_loss(model, ids)
        total += float(loss.detach()) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
        loss.backward()
        del loss
    sums = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(sums) == len(wanted)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, total / count


def in_memory_forward(
    model_dir: Path, windows: list[list[int]], batch: int
) -> tuple[float, float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from plangen.heldout import mean_loss

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    loss = mean_loss(model, windows, batch_size=batch)
    return t1 - t0, time.perf_counter() - t1, loss


def walk_forward(
    model_dir: Path, windows: list[list[int]], batch: int, resident: bool
) -> tuple[float, float, float]:
    from executor.layerwise import LayerWalk

    t0 = time.perf_counter()
    with LayerWalk.open(model_dir, resident=resident, batch_size=batch) as walk:
        t1 = time.perf_counter()
        loss = walk.loss(walk.run(windows))
    return t1 - t0, time.perf_counter() - t1, loss


def walk_sweep(
    model_dir: Path, windows: list[list[int]], batch: int, resident: bool
) -> tuple[float, float, float]:
    from executor.layerwise import LayerWalk

    names = table_names(model_dir)
    seen: list[int] = []

    def on_layer(i: int, module: Any) -> None:
        grads = [p.grad for n, p in module.named_parameters() if n in names]
        assert all(g is not None for g in grads)
        seen.append(i)

    t0 = time.perf_counter()
    with LayerWalk.open(model_dir, resident=resident, batch_size=batch) as walk:
        t1 = time.perf_counter()
        loss = walk.backward_sweep(windows, on_layer, wants=lambda _i, n: n in names)
        assert seen == list(reversed(range(walk.num_layers)))
    return t1 - t0, time.perf_counter() - t1, loss


# --------------------------------------------------------------------------- main


PASSES: dict[str, tuple[str, str]] = {  # name: (kind, label)
    "grad": ("grad", "in memory: forward + backward"),
    "grad-ckpt": ("grad", "in memory, checkpointing"),
    "sweep": ("grad", "layer-wise sweep"),
    "sweep-resident": ("grad", "resident sweep"),
    "forward": ("fwd", "in memory: mean_loss"),
    "walk": ("fwd", "layer-wise walk"),
    "walk-resident": ("fwd", "resident walk"),
}


def run_pass(name: str, model: Path, windows: list[list[int]], batch: int) -> tuple[float, ...]:
    if name in ("grad", "grad-ckpt"):
        return in_memory_gradients(model, windows, batch, name == "grad-ckpt")
    if name == "forward":
        return in_memory_forward(model, windows, batch)
    run = walk_sweep if name.startswith("sweep") else walk_forward
    return run(model, windows, batch, name.endswith("resident"))


def child(args: argparse.Namespace) -> tuple[float, ...]:
    """One pass in a fresh process (`--child NAME`): no allocator or thread-pool state
    left by another pass (the layer-wise walk fixes glibc's mmap threshold process-wide)."""
    cmd = [sys.executable, __file__, "--child", args.child_name, "--model", str(args.model)]
    cmd += ["--windows", str(args.windows), "--tokens", str(args.tokens)]
    cmd += ["--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--passes", default=",".join(PASSES), help="which passes, comma-separated")
    p.add_argument("--out", help="write the table (markdown) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        windows = calibration_windows(args.model, args.windows, args.tokens)
        print(json.dumps(run_pass(args.child, args.model, windows, args.batch_size)))
        return 0
    names = args.passes.split(",")
    args.load_start = os.getloadavg()[0]
    best: dict[str, tuple[float, ...]] = {}
    for _ in range(args.repeat):  # rounds: every pass once per round, the fastest kept
        for name in names:
            args.child_name = name
            got = child(args)
            if name not in best or got[0] + got[1] < best[name][0] + best[name][1]:
                best[name] = got
            load, run, loss = got
            print(f"{name}: load {load:.2f} s, pass {run:.2f} s, loss {loss:.6f}", flush=True)
    rows = [(*PASSES[n], best[n]) for n in names]
    table = _table(rows)
    print(table)
    if args.out:
        _write_result(Path(args.out), args, table, torch.get_num_threads())
    return 0


def _table(rows: list[tuple[str, str, tuple[float, ...]]]) -> str:
    """Markdown rows; ratios to the first in-memory row of the same kind (gradients,
    forward): total (load + pass) and pass alone."""
    first: dict[str, tuple[float, float]] = {}
    for kind, label, got in rows:
        if label.startswith("in memory") and kind not in first:
            first[kind] = (got[0] + got[1], got[1])
    lines = [
        "| pass | load s | pass s | total s | ratio (total) | ratio (pass) | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label, (load, run, loss) in rows:
        total_ref, pass_ref = first[kind]
        lines.append(
            f"| {label} | {load:.2f} | {run:.2f} | {load + run:.2f} | "
            f"{(load + run) / total_ref:.2f} | {run / pass_ref:.2f} | {loss:.6f} |"
        )
    return "\n".join(lines)


def _write_result(out: Path, args: argparse.Namespace, table: str, threads: int) -> None:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    cmd = "python " + " ".join(["benchmarks/layerwise_time.py", *sys.argv[1:]])
    head = (
        f"Command: `{cmd}`; commit {commit}; {datetime.date.today().isoformat()}; "
        f"{threads} torch threads; float32, CPU; {args.windows} windows x {args.tokens} "
        f"tokens, batches of {args.batch_size}; fastest of {args.repeat} rounds; "
        f"1-minute load average {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
        "at the end.\n\n"
    )
    out.write_text(head + table + "\n")


if __name__ == "__main__":
    sys.exit(main())
