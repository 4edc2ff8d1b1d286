"""Memory of the reverse sweep with each layer sharded across processes (issue 36 item 4).

`LayerWalk.backward_sweep` holds one decoder layer, its gradient sums and one batch's
gradients at a time; `--shard-layers` (`executor.sharding`, FSDP2) splits those across
torchrun's processes, one projection gathered whole at a time. This script measures
what each process holds during the sweep: on a random Llama checkpoint with Llama-3-8B
layers (hidden 4096, MLP 14336, 32:8 GQA; a small vocabulary, so the head does not
hide the layer), `--layers` layers, bf16 on disk, float32 in the sweep, gradients of
the projections (calibration's choice), over `--windows` windows of `--tokens` tokens,
batches of one:

- one process, the layer whole (the layer-wise walk as `plangen analyze --offload`);
- N processes under torchrun (`--procs`, e.g. 2,4), every layer sharded (the same
  walk with `shard_layers=True`; every process runs every batch).

Per process: the peak RssAnon during the sweep above its RssAnon before it (states,
runtime and the boundaries already there), sampled every 2 ms (safetensors maps the
files, so the high-water mark would count page cache), and the sweep's seconds; and a
digest of every layer's summed gradients, which must be the single process's on every
rank (the sums are bit-identical: tests/executor/test_sharded_sweep.py). All processes
share this machine's cores, so the seconds say what the redundant per-process compute
costs here, not what N devices would take.

Usage: python benchmarks/sharded_sweep.py [--layers 2] [--procs 2,4] [--windows 2]
           [--tokens 128] [--dir DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.analyze_cost import rss_anon  # noqa: E402
from benchmarks.layerwise_memory import LLAMA3_8B, PeakSampler, build  # noqa: E402

SHAPE = {**LLAMA3_8B, "vocab_size": 2048}


def child(model_dir: Path, windows: int, tokens: int) -> None:
    """One process's sweep (sharded when torchrun started several): prints a JSON line."""
    import torch

    from executor import distributed
    from executor.layerwise import LayerWalk

    sharded = distributed.launched()
    if sharded:
        torch.distributed.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (windows, tokens), generator=g).tolist()
    digest = hashlib.sha256()

    def on_layer(i: int, module: torch.nn.Module) -> None:
        from executor.sharding import full

        for name, p in module.named_parameters():
            if p.grad is not None:
                digest.update(f"{i}.{name}".encode())
                digest.update(full(p.grad).contiguous().view(torch.uint8).numpy().tobytes())

    with LayerWalk.open(model_dir, batch_size=1, shard_layers=sharded) as walk:
        bounds = walk.boundaries(ids)
        before = rss_anon(os.getpid())
        with PeakSampler() as sampler:
            started = time.perf_counter()
            loss = walk.backward_sweep(
                bounds, on_layer, wants=lambda _i, n: "proj" in n and "experts" not in n
            )
            seconds = time.perf_counter() - started
        peak = sampler.peak["RssAnon"]
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, "before": before, "peak": peak, "seconds": seconds, "loss": loss}
    print(json.dumps({**row, "digest": digest.hexdigest()}), flush=True)
    if sharded:
        torch.distributed.destroy_process_group()


def run(model_dir: Path, procs: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--child", str(model_dir)]
    me += ["--windows", str(args.windows), "--tokens", str(args.tokens)]
    if procs == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={procs}", *me]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{procs} processes failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--procs", default="2,4", help="process counts to shard across")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dir", type=Path, help="where the checkpoint is built (kept)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.windows, args.tokens)
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="plancc-sharded-"))
    model_dir = build(root, args.layers, SHAPE)
    want: str | None = None
    lines = [
        "| processes | rank | RssAnon before the sweep GB | sweep's peak above it GB "
        "| sweep s | summed gradients |",
        "|---|---|---|---|---|---|",
    ]
    for procs in [1, *(int(p) for p in args.procs.split(","))]:
        for r in run(model_dir, procs, args):
            want = want or r["digest"]
            same = "reference" if procs == 1 else ("equal" if r["digest"] == want else "DIFFER")
            lines.append(
                f"| {procs} | {r['rank']} | {_gb(r['before'])} | {_gb(r['peak'] - r['before'])} "
                f"| {r['seconds']:.1f} | {same} |"
            )
    head = (
        f"Sharded reverse sweep, {args.layers} Llama-3-8B-shaped layers (vocab 2048), "
        f"{args.windows} x {args.tokens} tokens, float32; "
        f"{datetime.date.today()}, commit {_commit()}"
    )
    text = "\n".join([head, "", *lines])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    main()
