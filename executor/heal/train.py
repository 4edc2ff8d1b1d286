"""The training loop: AdamW, linear warm-up then decay, gradient accumulation, clipping.

Deterministic for a seed: the windows are shuffled per epoch by a generator
seeded with `seed + epoch`, and LoRA's dropout draws from torch's generator,
seeded once. A fractional `--epochs` trains on that share of the batches. Every
`save_every` optimizer steps the trainable weights, the optimizer, the schedule
and the generator go to a checkpoint file, so `--resume` continues exactly
where a killed run stopped. A loss or gradient that is not finite stops the run
with what to try, instead of writing a model of NaNs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executor.heal.loss import objective
from executor.heal.options import HealError, HealOptions


class NonFiniteLoss(HealError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainLog:
    steps: int = 0  # optimizer steps
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    resumed_at: int | None = None  # the batch a --resume continued from

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def plan_batches(n: int, opts: HealOptions) -> list[list[int]]:
    """Window indices of every batch, in training order (epochs may be fractional)."""
    per_epoch = math.ceil(n / opts.batch)
    total = max(1, math.ceil(opts.epochs * per_epoch))
    out: list[list[int]] = []
    epoch = 0
    while len(out) < total:
        gen = torch.Generator().manual_seed(opts.seed + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        out += [order[i : i + opts.batch] for i in range(0, n, opts.batch)]
        epoch += 1
    return out[:total]


def _fingerprint(opts: HealOptions, n: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    keys = ("method", "teacher", "r", "alpha", "dropout", "targets", "lr", "epochs", "seqlen")
    keys += ("batch", "grad_accum", "max_grad_norm", "warmup", "seed", "kd_weight")
    keys += ("temperature", "teacher_topk", "data")
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(opts, k)) for k in keys)
    } | {"windows": n}


def train(
    model: Any,
    windows: Sequence[Sequence[int]],
    opts: HealOptions,
    teacher: Any | None = None,
    state_path: Path | None = None,
    desc: str = "heal",
) -> TrainLog:
    """Train `model`'s trainable parameters on `windows`; the log of what happened."""
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(opts.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise HealError("nothing to train: the model has no trainable parameters")
    params = [p for _, p in named]
    batches = plan_batches(len(windows), opts)
    total_steps = math.ceil(len(batches) / opts.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(
        optimizer, min(opts.warmup, total_steps), total_steps
    )
    log = TrainLog()
    start = 0
    fingerprint = _fingerprint(opts, len(windows))
    if opts.resume and state_path is not None and state_path.is_file():
        start = _load_state(state_path, named, optimizer, schedule, log, fingerprint)
        log.resumed_at = start
    cuda = str(opts.device).startswith("cuda")
    model.train()
    if teacher is not None:
        teacher.eval()
    began = time.perf_counter() - log.seconds
    bar = tqdm(
        total=len(batches), initial=start, desc=desc, unit="batch", disable=not opts.progress
    )
    pending: list[tuple[float, float]] = []  # (loss, LM loss) of the step's batches
    try:
        for b in range(start, len(batches)):
            ids = torch.tensor([list(windows[i]) for i in batches[b]], device=opts.device)
            group = b // opts.grad_accum
            size = min(opts.grad_accum, len(batches) - group * opts.grad_accum)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss, lm = objective(
                    model, ids, teacher, opts.kd_weight, opts.temperature, opts.teacher_topk
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(_non_finite("loss", value, log.steps, opts))
            (loss / size).backward()
            log.batches += 1
            log.tokens += ids.numel()
            pending.append((value, lm))
            if (b + 1) % opts.grad_accum == 0 or b + 1 == len(batches):
                norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm))
                if not math.isfinite(norm):
                    raise NonFiniteLoss(_non_finite("gradient norm", norm, log.steps, opts))
                lr = schedule.get_last_lr()[0]
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                log.steps += 1
                log.curve.append(
                    {
                        "step": log.steps,
                        "loss": sum(v for v, _ in pending) / len(pending),
                        "lm_loss": sum(v for _, v in pending) / len(pending),
                        "lr": lr,
                        "grad_norm": norm,
                        "tokens": log.tokens,
                    }
                )
                pending.clear()
                log.seconds = time.perf_counter() - began
                if state_path is not None and opts.save_every and log.steps % opts.save_every == 0:
                    _save_state(state_path, named, optimizer, schedule, log, b + 1, fingerprint)
            log.seconds = time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{log.tokens_per_second:,.0f}")
    finally:
        bar.close()
        model.eval()
    return log


def _non_finite(what: str, value: float, step: int, opts: HealOptions) -> str:
    return (
        f"training stopped: the {what} became {value} at optimizer step {step + 1} "
        f"(--lr {opts.lr:g}); nothing was written. Try a lower --lr (e.g. {opts.lr / 10:g}), "
        "a lower --max-grad-norm, or fp32 on the GPU (no bf16 autocast: --device cpu to check)"
    )


def _save_state(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    optimizer: Any,
    schedule: Any,
    log: TrainLog,
    next_batch: int,
    fingerprint: dict[str, Any],
) -> None:
    """Write the resumable state atomically (a killed save leaves the previous one)."""
    state = {
        "fingerprint": fingerprint,
        "next_batch": next_batch,
        "weights": {n: p.detach().cpu().clone() for n, p in named},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "log": dict(vars(log)),
        "rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    optimizer: Any,
    schedule: Any,
    log: TrainLog,
    fingerprint: dict[str, Any],
) -> int:
    state = torch.load(path, weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise HealError(
            f"--resume: {path} was written with other options ({', '.join(changed)} differ); "
            "run with the same options, or without --resume to start again"
        )
    with torch.no_grad():
        for n, p in named:
            p.copy_(state["weights"][n].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for k, v in state["log"].items():
        setattr(log, k, v)
    torch.set_rng_state(state["rng"])
    return int(state["next_batch"])
