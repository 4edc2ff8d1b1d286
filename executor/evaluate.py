"""`plancc eval`: perplexity, parameters, a greedy sample and decode speed.

Measures each model on the protocol of `compiler.corpus` (same text, same
split, same windows), so the original and every pruned variant compare
directly. Every figure comes from the run that prints it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compiler.corpus import TokenPools, load_text, tokenize, windows

DEFAULT_PROMPT = "The three most useful Python built-in functions are"


@dataclass(frozen=True)
class EvalResult:
    model: str
    params: int
    perplexity: float
    eval_tokens: int
    windows: int
    seqlen: int
    sample: str
    tokens_per_s: float
    data: str
    text_sha256: str


def model_dir(path: Path) -> Path:
    """A checkpoint directory, or the `A` model inside a `plancc apply` output."""
    if (path / "config.json").is_file():
        return path
    if (path / "A" / "config.json").is_file():
        return path / "A"
    raise FileNotFoundError(
        f"{path} holds no config.json (nor A/config.json): pass a checkpoint directory or the "
        "output directory of `plancc apply`"
    )


def load_model(path: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer). Heterogeneous plancc outputs go through `executor.loader`."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = model_dir(path)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    from executor.loader import load
    from executor.tokenizer import load_tokenizer

    if "plancc" in config:
        model = load(directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = model.to(device=device, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(directory)  # never a directory's own code
    return model, tokenizer


def perplexity(model: Any, chunks: list[list[int]], device: str, progress: bool = True) -> float:
    """exp(total NLL / predicted tokens) over non-overlapping windows."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    total_nll, predicted = 0.0, 0
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress):
            ids = torch.tensor([chunk], device=device)  # (1, T)
            logits = model(ids).logits[:, :-1].float()  # (1, T-1, V)
            target = ids[:, 1:]  # (1, T-1)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            predicted += target.numel()
    return math.exp(total_nll / predicted) if predicted else float("nan")


SPEED_REPEATS = 3


def greedy_sample(
    model: Any, tokenizer: Any, device: str, new_tokens: int, repeats: int = SPEED_REPEATS
) -> tuple[str, float]:
    """A greedy continuation of a fixed prompt, and decode speed in tokens/s.

    The first generate warms up (lazy initialization, allocator, kernel
    selection) and is not timed; the speed is the median of `repeats` timed
    runs, so one slow run (a page fault, another process) does not decide.
    """
    import torch

    prompt = tokenizer(DEFAULT_PROMPT, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate() -> Any:
        out = model.generate(
            **prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return out

    speeds = []
    with torch.no_grad():
        out = generate()  # warm-up, untimed
        generated = out[0, prompt["input_ids"].shape[1] :]
        for _ in range(repeats):
            start = time.perf_counter()
            generate()
            speeds.append(len(generated) / (time.perf_counter() - start))
    return tokenizer.decode(generated, skip_special_tokens=True), statistics.median(speeds)


def check_inputs(paths: list[Path], seqlen: int, limit: int | None, new_tokens: int) -> None:
    """Every argument of `plancc eval`, checked before the first model is loaded:
    a typo in the last model must not cost an evaluation of the first."""
    if seqlen < 2:
        raise ValueError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: evaluate at least 1 window, or leave --limit out")
    if new_tokens < 1:
        raise ValueError(f"--new-tokens {new_tokens}: generate at least 1 token")
    problems = []
    for path in paths:
        try:
            model_dir(path)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise FileNotFoundError("; ".join(problems))


def evaluate(
    path: Path,
    data: str = "builtin",
    seqlen: int = 512,
    device: str = "cpu",
    limit: int | None = None,
    new_tokens: int = 32,
    data_files: list[str] | None = None,
    progress: bool = True,
    text: str | None = None,
) -> EvalResult:
    """Evaluate one model; `text` is the corpus already read (else it is loaded)."""
    model, tokenizer = load_model(path, device)
    if text is None:
        text = load_text(data, data_files)
    pools = TokenPools.split(tokenize(text, tokenizer), text)
    chunks = windows(pools.evaluation, seqlen, limit)
    ppl = perplexity(model, chunks, device, progress)
    sample, speed = greedy_sample(model, tokenizer, device, new_tokens)
    return EvalResult(
        model=str(path),
        params=sum(p.numel() for p in model.parameters()),
        perplexity=ppl,
        eval_tokens=sum(len(c) - 1 for c in chunks),
        windows=len(chunks),
        seqlen=seqlen,
        sample=sample,
        tokens_per_s=speed,
        data=data,
        text_sha256=pools.text_sha256,
    )


def _change(before: float, after: float) -> str:
    if not before or math.isnan(before) or math.isnan(after):
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def render_table(results: list[EvalResult]) -> str:
    """One comparison table: the first model is the reference for every change column."""
    base = results[0]
    head = f"{'model':<40}{'params':>14}{'Δ':>9}{'ppl':>13}{'Δ':>12}{'tok/s':>8}{'Δ':>9}"
    lines = [
        f"perplexity on {base.data} (sha256 {base.text_sha256[:12]}), last 40% of tokens, "
        f"{base.windows} windows of {base.seqlen}, {base.eval_tokens:,} predicted tokens; "
        f"tok/s: greedy decoding, median of {SPEED_REPEATS} runs after a warm-up",
        head,
    ]
    for r in results:
        name = r.model if len(r.model) <= 38 else "…" + r.model[-37:]
        lines.append(
            f"{name:<40}{r.params:>14,}{_change(base.params, r.params):>9}"
            f"{r.perplexity:>13.3f}{_change(base.perplexity, r.perplexity):>12}"
            f"{r.tokens_per_s:>8.1f}{_change(base.tokens_per_s, r.tokens_per_s):>9}"
        )
    lines.append("")
    for r in results:
        sample = (DEFAULT_PROMPT + r.sample).replace("\n", "⏎")
        lines.append(f"{r.model}: {sample}")
    return "\n".join(lines)


def results_json(results: list[EvalResult]) -> str:
    return json.dumps({"prompt": DEFAULT_PROMPT, "results": [asdict(r) for r in results]}, indent=2)
