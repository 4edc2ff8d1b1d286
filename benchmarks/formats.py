"""One pruned SmolLM2 result, three serving formats, three loaders: same perplexity?

Applies a plan (default: the `auto` plan at -25% that benchmarks/target_cost.py
wrote) once per format and measures each where people would run it:

  hf            plancc's loader (`executor.load`, what `plancc eval` uses)
  nemotron-nas  stock transformers, `AutoModelForCausalLM.from_pretrained(A,
                trust_remote_code=True)` with HF_HUB_OFFLINE=1: only the
                configuration and modeling files plancc wrote beside the weights
  gguf          llama.cpp (llama-cpp-python), the GGUF file `--format gguf` wrote,
                f32 and f16

Protocol: builtin corpus, the first 24 evaluation windows of 512 tokens
(`compiler.corpus`, as `plancc eval --limit 24`), token ids from the model's
tokenizer, fed to each runtime as ids, perplexity = exp(total NLL / predicted
tokens); tokens/s: greedy decoding of 32 tokens from one prompt, median of 3
runs after a warm-up, 2 CPU threads. The table's last column is each
perplexity's difference from `executor.load`'s.

Usage: python benchmarks/formats.py [--plan /tmp/plancc-target-cost/any/plan.prn]
       [--model DIR] [--limit 24] [--out /tmp/plancc-formats]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

NEW_TOKENS = 32
REPEATS = 3


def torch_ppl_and_speed(model: Any, tokenizer: Any, chunks: list[list[int]]) -> tuple[float, float]:
    from executor.evaluate import greedy_sample, perplexity

    ppl = perplexity(model, chunks, "cpu", progress=False)
    _, speed = greedy_sample(model, tokenizer, "cpu", NEW_TOKENS, REPEATS)
    return ppl, speed


def llama_cpp_ppl_and_speed(
    path: Path, chunks: list[list[int]], prompt: list[int]
) -> tuple[float, float]:
    """Perplexity from llama.cpp's logits on the same ids, and its greedy decode speed."""
    import llama_cpp
    import numpy as np

    seqlen = max(len(c) for c in chunks)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    try:
        nll, predicted = 0.0, 0
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk)
            logits = np.array(llm.scores[: len(chunk) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            target = np.array(chunk[1:])
            nll -= float(logp[np.arange(len(target)), target].sum())
            predicted += len(target)
        speeds = []
        for run in range(REPEATS + 1):
            llm.reset()
            start = time.perf_counter()
            made = 0
            for _ in llm.generate(prompt, temp=0.0, reset=True):
                made += 1
                if made == NEW_TOKENS:
                    break
            if run:  # the first run warms up
                speeds.append(made / (time.perf_counter() - start))
        return math.exp(nll / predicted), statistics.median(speeds)
    finally:
        llm.close()


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiler.corpus import TokenPools, load_text, tokenize, windows
    from executor.apply import apply_plan
    from executor.evaluate import DEFAULT_PROMPT
    from executor.loader import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.path.expanduser("~/.cache/plancc/SmolLM2-135M-Instruct"))
    parser.add_argument("--plan", type=Path, default=Path("/tmp/plancc-target-cost/any/plan.prn"))
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/plancc-formats"))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(2)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    outs = {}
    for fmt in ("hf", "nemotron-nas", "gguf"):
        outs[fmt] = args.out / fmt
        start = time.perf_counter()
        apply_plan(args.plan, outs[fmt], model=args.model, model_format=fmt, gguf_dtype="f32")
        print(f"apply --format {fmt}: {time.perf_counter() - start:.1f} s")
    from executor.formats.export import export

    export(outs["hf"], args.out / "gguf-f16", "gguf", dtype="f16")
    tokenizer = AutoTokenizer.from_pretrained(outs["hf"] / "A")
    text = load_text("builtin")
    pools = TokenPools.split(tokenize(text, tokenizer), text)
    chunks = windows(pools.evaluation, 512, args.limit)
    prompt = tokenizer(DEFAULT_PROMPT)["input_ids"]
    rows = []
    model = load(outs["hf"] / "A", dtype="float32")
    rows.append(
        ("hf", "executor.load (plancc eval)", *torch_ppl_and_speed(model, tokenizer, chunks))
    )
    del model
    model = AutoModelForCausalLM.from_pretrained(
        outs["nemotron-nas"] / "A", trust_remote_code=True, dtype=torch.float32
    ).eval()
    rows.append(
        (
            "nemotron-nas",
            f"transformers trust_remote_code ({type(model).__name__})",
            *torch_ppl_and_speed(model, tokenizer, chunks),
        )
    )
    del model
    for label, path in (
        ("gguf f32", outs["gguf"] / "model.gguf"),
        ("gguf f16", args.out / "gguf-f16" / "model.gguf"),
    ):
        rows.append(
            (label, "llama.cpp (llama-cpp-python)", *llama_cpp_ppl_and_speed(path, chunks, prompt))
        )
    reference = rows[0][2]
    print(f"\nplan: {args.plan}; {len(chunks)} windows of 512, builtin corpus, CPU, 2 threads")
    print(f"{'format':<14}{'loader':<50}{'ppl':>9}{'tok/s':>8}{'Δ ppl':>9}")
    for fmt, loader, ppl, speed in rows:
        change = f"{(ppl - reference) / reference * 100:+.3f}%"
        print(f"{fmt:<14}{loader:<50}{ppl:>9.3f}{speed:>8.1f}{change:>9}")


if __name__ == "__main__":
    main()
