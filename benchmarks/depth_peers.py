"""Depth pruning on SmolLM2-135M-Instruct: plancc's ShortGPT and angular-distance
scores against the peers' published shapes and perplexities, one protocol.

Protocol (issue 11): builtin corpus, seqlen 512, 32 calibration windows from the
start of the calibration pool, fp32, perplexity on the first 24 evaluation
windows (`plancc eval --limit 24`), no healing. For each method and size it
calibrates once (one forward pass over the calibration set collects both
scores), writes the plan, applies it with `plancc apply`, evaluates the result
and prints the layers chosen, the peer's layers, perplexity and the peer's
figure.

Usage: python benchmarks/depth_peers.py [--model DIR] [--out /tmp/plancc-depth-peers]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

PEERS = {  # method, layers dropped -> (the peer's layers, the peer's perplexity)
    ("ShortGPT block influence", 5): ([13, 14, 17, 25, 26], 26.08),
    ("ShortGPT block influence", 9): ([3, 12, 13, 14, 15, 16, 17, 25, 26], 55.50),
    ("Gromov angular block", 5): (list(range(11, 16)), 103.3),
    ("Gromov angular block", 9): (list(range(10, 19)), 163.1),
}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiler.checkpoint import load_checkpoint_facts
    from compiler.corpus import TokenPools, load_text, tokenize, windows
    from compiler.ir import Selection
    from executor.apply import apply_plan
    from executor.evaluate import evaluate
    from plangen.calibrate import depth_stats

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.path.expanduser("~/.cache/plancc/SmolLM2-135M-Instruct"))
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-depth-peers"))
    args = parser.parse_args()
    ck = load_checkpoint_facts(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    text = load_text("builtin")
    pools = TokenPools.split(tokenize(text, tok), text)
    t0 = time.perf_counter()
    stats = depth_stats(model, ck.arch, windows(pools.calibration, 512, 32))
    calib_s = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model
    layers = ck.facts["layers"]
    bi = stats.block_influence()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base = evaluate(args.model, limit=24, progress=False, new_tokens=1).perplexity
    print(
        f"calibration: 32 x 512 tokens, one forward pass, {calib_s:.1f} s, peak RSS {rss_mb:.0f} MB"
    )
    print(f"original: perplexity {base:.2f} (first 24 evaluation windows)\n")
    print(
        f"{'method':<26} {'n':>2}  {'plancc layers':<34} {'same as peer':<12} "
        f"{'ppl':>8} {'peer ppl':>8}"
    )
    for (method, n), (peer_layers, peer_ppl) in PEERS.items():
        if method.startswith("ShortGPT"):
            drop = sorted(sorted(range(layers - 1), key=lambda k: (bi[k], k))[:n])
        else:
            start, _ = stats.best_block(n)
            drop = list(range(start, start + n))
        plan = args.out / f"{method.split()[0].lower()}-{n}.prn"
        plan.write_text(
            f'plan 1\n{ck.model_block()}source "{args.model}"\n\n'
            f"drop layers {Selection.from_ints(drop)}  # {method}\n",
            encoding="utf-8",
        )
        out = args.out / plan.stem
        apply_plan(plan, out)
        ppl = evaluate(out / "A", limit=24, progress=False, new_tokens=1).perplexity
        shown = str(Selection.from_ints(drop))
        print(
            f"{method:<26} {n:>2}  {shown:<34} {drop == peer_layers!s:<12} "
            f"{ppl:>8.2f} {peer_ppl:>8.2f}"
        )


if __name__ == "__main__":
    main()
