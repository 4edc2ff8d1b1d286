"""The training loop: AdamW, linear warm-up then decay, gradient accumulation, clipping.

Deterministic for a seed: the windows are shuffled per epoch by a generator
seeded with `seed + epoch`, and LoRA's dropout draws from torch's generator,
seeded once. A fractional `--epochs` trains on that share of the batches. Every
`save_every` optimizer steps the trainable weights, the optimizer, the schedule
and the generator go to a safetensors file plus a JSON record (no pickle, so a
planted state file cannot run code), so `--resume` continues exactly where a
killed run stopped; a damaged state is refused with the fix. A loss or
gradient that is not finite stops the run with what to try, instead of
writing a model of NaNs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from heal.loss import objective
from heal.options import HealError, HealOptions


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


def state_fingerprint(opts: HealOptions, n: int) -> dict[str, Any]:
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
    fingerprint = state_fingerprint(opts, len(windows))
    if opts.resume and state_path is not None and state_path.is_file():
        start = _load_state(state_path, named, optimizer, schedule, log, fingerprint, len(batches))
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
            value = _accumulate(model, windows, batches, b, opts, teacher, cuda, log, pending)
            if (b + 1) % opts.grad_accum == 0 or b + 1 == len(batches):
                _optimizer_step(params, optimizer, schedule, opts, log, pending)
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


def _accumulate(
    model: Any,
    windows: Sequence[Sequence[int]],
    batches: list[list[int]],
    b: int,
    opts: HealOptions,
    teacher: Any | None,
    cuda: bool,
    log: TrainLog,
    pending: list[tuple[float, float]],
) -> float:
    """Batch `b`'s forward and backward: its gradient is added to the step's, scaled by
    the step's batch count (the last step of a run may have fewer); returns its loss."""
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
    return value


def _optimizer_step(
    params: list[Any],
    optimizer: Any,
    schedule: Any,
    opts: HealOptions,
    log: TrainLog,
    pending: list[tuple[float, float]],
) -> None:
    """One optimizer step on the accumulated gradient (clipped; a NaN norm stops the
    run before the weights change) and its point on the loss curve."""
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


def _non_finite(what: str, value: float, step: int, opts: HealOptions) -> str:
    return (
        f"training stopped: the {what} became {value} at optimizer step {step + 1} "
        f"(--lr {opts.lr:g}); nothing was written. Try a lower --lr (e.g. {opts.lr / 10:g}), "
        "a lower --max-grad-norm, or fp32 on the GPU (no bf16 autocast: --device cpu to check)"
    )


STATE_FORMAT = 1  # of train-STAGE.json
_DAMAGED = (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError)


def state_tensors_name(record: Path, next_batch: int) -> str:
    """The tensor file a state record commits to: `train-A-batch00000006.safetensors`."""
    return f"{record.stem}-batch{next_batch:08d}.safetensors"


def _save_state(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    optimizer: Any,
    schedule: Any,
    log: TrainLog,
    next_batch: int,
    fingerprint: dict[str, Any],
) -> None:
    """Write the resumable state as safetensors plus JSON, never a pickle.

    The tensors (trainable weights, optimizer moments, generator states as uint8)
    go to a new file named after the batch, then the JSON record `path` naming it
    is replaced atomically: that rename is the commit, so a run killed at any
    point leaves a record whose tensor file is complete. Older tensor files go
    after the commit.
    """
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {
        f"weights.{n}": p.detach().to("cpu").contiguous().clone() for n, p in named
    }
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = state_tensors_name(path, next_batch)
    record = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "next_batch": next_batch,
        "tensors": name,
        "weights": [n for n, _ in named],
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "schedule": schedule.state_dict(),
        "log": dict(vars(log)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path.parent / name, lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps(record, indent=1) + "\n"
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for old in path.parent.glob(f"{path.stem}-batch*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _atomic(path: Path, write: Any) -> None:
    """`write(tmp)` then rename onto `path`; a failed or interrupted write leaves no tmp."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _damaged(path: Path, why: str) -> HealError:
    return HealError(
        f"--resume: the training state {path} is damaged or incomplete ({why}); run without "
        f"--resume to start over (that removes {path.parent}), or remove it yourself"
    )


def read_state(path: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The validated JSON record of a resumable state and its tensor file.

    Reads the tensor file's header only (cheap); `_load_state` reads the data.
    HealError naming the file and the fix on anything unreadable or inconsistent.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"cannot read it: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise _damaged(path, f"not a format-{STATE_FORMAT} plancc heal state")
    if not isinstance(record.get("fingerprint"), dict):
        raise _damaged(path, "no `fingerprint`")
    if record["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if record["fingerprint"].get(k) != fingerprint[k])
        raise HealError(
            f"--resume: {path} was written with other options ({', '.join(changed)} differ); "
            "run with the same options, or without --resume to start again"
        )
    batch = record.get("next_batch")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise _damaged(path, "`next_batch` is not a batch number")
    tensors = path.parent / state_tensors_name(path, batch)
    if record.get("tensors") != tensors.name:
        raise _damaged(path, f"`tensors` should be {tensors.name}")
    for key, kind in (("weights", list), ("optimizer", dict), ("schedule", dict), ("log", dict)):
        if not isinstance(record.get(key), kind):
            raise _damaged(path, f"`{key}` is missing or malformed")
    try:
        with safe_open(str(tensors), framework="pt") as fh:
            names = set(fh.keys())
    except _DAMAGED as exc:
        raise _damaged(tensors, f"cannot read it: {exc}") from None
    missing = [f"weights.{n}" for n in record["weights"] if f"weights.{n}" not in names]
    if missing or "rng.cpu" not in names:
        raise _damaged(tensors, f"tensors missing: {(missing or ['rng.cpu'])[:3]}")
    return record, tensors


def _load_state(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    optimizer: Any,
    schedule: Any,
    log: TrainLog,
    fingerprint: dict[str, Any],
    batches: int,
) -> int:
    """Restore weights, optimizer, schedule, log and generators; the batch to continue at.

    Everything is read and checked before the model is touched.
    """
    record, file = read_state(path, fingerprint)
    if record["next_batch"] > batches:
        raise _damaged(path, f"`next_batch` {record['next_batch']} is past the {batches} batches")
    if record["weights"] != [n for n, _ in named]:
        raise _damaged(path, "its trainable weights are not this model's")
    try:
        tensors = load_file(str(file))
        weights = [tensors[f"weights.{n}"] for n, _ in named]
        for (n, p), w in zip(named, weights, strict=True):
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"{n} has shape {tuple(w.shape)}, the model {tuple(p.shape)}")
        state = _optimizer_state(record["optimizer"], tensors, optimizer)
        rng = tensors["rng.cpu"]
        probe = torch.Generator()
        probe.set_state(rng)  # refuses a malformed generator state before anything is set
    except _DAMAGED as exc:
        raise _damaged(file, str(exc)) from None
    try:
        optimizer.load_state_dict(state)
        schedule.load_state_dict(record["schedule"])
    except _DAMAGED as exc:
        raise _damaged(path, f"the optimizer or schedule does not fit: {exc}") from None
    with torch.no_grad():
        for (_, p), w in zip(named, weights, strict=True):
            p.copy_(w.to(p.device, p.dtype))
    for k, v in record["log"].items():
        if k in TrainLog.__dataclass_fields__:
            setattr(log, k, v)
    torch.set_rng_state(rng)
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(record["next_batch"])


def _optimizer_state(
    saved: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: Any
) -> dict[str, Any]:
    """An optimizer `state_dict` from the JSON part and the tensors `optimizer.I.KEY`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            idx, key = name[len("optimizer.") :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, slots in saved.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    groups = saved["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current):
        raise ValueError("the optimizer's parameter groups differ")
    # JSON has no tuples: give back the type the optimizer uses (AdamW's betas)
    groups = [
        {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in g.items()}
        for g, now in zip(groups, current, strict=True)
    ]
    return {"state": state, "param_groups": groups}
