"""Are plangen's plans and sidecars, and plancc's outputs, byte-identical across commits?

A refactor that promises "behaviour unchanged" is checked by running this on the
commit before and the commit after and comparing the two listings (`diff`): every
line is one output file and its sha256.

What it runs, on the SmolLM2 demo checkpoint and (when `../shared` is present)
the trained tiny Qwen2-MoE fixture, all on CPU in float32:

  smol-auto       plangen analyze (auto) with a short calibration: every
                  strategy's candidates, the reconstruction walks and the judge
  smol-uniform    --strategy uniform --ratio 0.3 --reconstruct
  smol-depth      --drop 4 (block influence)
  smol-global     --scores of smol-auto, --strategy global (no calibration)
  moe-default     the MoE fixture, --drop-experts 0.25 (router statistics, probes)
  moe-budget      the MoE fixture, --target-params 0.8
  apply-*         plancc apply of smol-auto, smol-depth and examples/smollm2-mixed.prn

The output marker is hashed without its pid and creation time. Paths are fixed
(under --work, default /tmp/plancc-identical) so that the
plans' `source` lines and provenance comments are the same on both runs.

Usage: python benchmarks/identical_outputs.py [--work DIR] > before.txt
       (check out the other commit) ... > after.txt; diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOE = ROOT.parent / "shared" / "fixtures" / "qwen2moe-tiny"
MARKER = ".plancc-output.json"  # its pid and creation time differ from run to run
SHORT = ["--nsamples", "8", "--seqlen", "128", "--heldout", "2", "--quiet"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")


def digest(path: Path) -> str:
    """sha256 of the file; of the output marker without its run's pid and start time."""
    if path.name != MARKER:
        return sha256(path)
    record = json.loads(path.read_text(encoding="utf-8"))
    stable = {k: v for k, v in record.items() if k not in ("pid", "created")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def listing(name: str, path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    base = path if path.is_dir() else path.parent
    return [f"{name:<14} {p.relative_to(base)}  {digest(p)}" for p in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/plancc-identical"))
    args = parser.parse_args()
    from plangen.demo import fetch_demo

    smol = fetch_demo(os.environ.get("PLANCC_CACHE"))
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    plangen, plancc = str(bin_dir / "plangen"), str(bin_dir / "plancc")
    out: list[str] = []

    sidecar = work / "smol-auto.scores.safetensors"
    analyses = [
        ("smol-auto", [str(smol), *SHORT]),
        (
            "smol-uniform",
            [str(smol), *SHORT, "--strategy", "uniform", "--ratio", "0.3", "--reconstruct"],
        ),
        ("smol-depth", [str(smol), *SHORT, "--drop", "4"]),
        (
            "smol-global",
            [str(smol), *SHORT, "--strategy", "global", "--scores", str(sidecar)],
        ),
    ]
    if (MOE / "config.json").exists():
        analyses += [
            ("moe-default", [str(MOE), *SHORT]),
            ("moe-budget", [str(MOE), *SHORT, "--target-params", "0.8"]),
        ]
    for name, argv in analyses:
        plan = work / f"{name}.prn"
        run(plangen, "analyze", *argv, "-o", str(plan))
        out += listing(name, plan)
        out += listing(name, plan.with_name(f"{name}.scores.safetensors"))
    plans = [work / "smol-auto.prn", work / "smol-depth.prn", ROOT / "examples/smollm2-mixed.prn"]
    for plan in plans:
        dest = work / f"apply-{plan.stem}"
        run(plancc, "apply", str(plan), "--model", str(smol), "-o", str(dest))
        out += listing(f"apply-{plan.stem}", dest)
    print("\n".join(out))


if __name__ == "__main__":
    main()
