"""What `plancc heal` is asked to do, validated before anything is loaded."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

from executor.device import DeviceError, check_device

METHODS = ("lora", "full")
TEACHERS = ("none", "original")
TARGET_PARTS = ("attn", "mlp")


class HealError(Exception):
    """Healing cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class HealOptions:
    out: Path  # the `plancc apply` output directory
    dest: Path  # HEALED
    stages: tuple[str, ...] = ("A",)
    data: str = "builtin"
    data_files: tuple[str, ...] = ()
    method: str = "lora"
    teacher: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGET_PARTS
    lr: float = 1e-3  # measured: better than the peers' 2e-4 on both texts at 33 steps
    epochs: float = 2.0
    seqlen: int = 512
    batch: int = 1
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    warmup: int = 3
    seed: int = 0
    device: str = "cpu"
    temperature: float = 1.0  # distillation: both at this temperature (Minitron: 1)
    # distillation: loss = w * KL + (1 - w) * LM loss; measured: 0.1 beats LoRA on both texts
    kd_weight: float = 0.1
    teacher_topk: int = 0  # distillation: KL over the teacher's top k tokens (0: all)
    max_windows: int | None = None  # train on at most this many windows (tests, smoke runs)
    checkpointing: bool = False  # gradient checkpointing
    save_every: int = 25  # optimizer steps between resumable checkpoints
    resume: bool = False
    force: bool = False
    eval_limit: int = 24  # evaluation windows of the report (0: no report)
    progress: bool = True

    def validate(self, bundles: tuple[str, ...]) -> None:
        """HealError naming the option and the fix for anything that cannot run."""
        self.validate_values()
        stages_ok(self.stages, bundles)

    def validate_values(self) -> None:
        """Every option that does not depend on the apply output, each with its allowed
        values: checked before anything is read, so nonsense never reaches training
        (where `--lr inf` would only show up as a NaN loss)."""
        if self.method not in METHODS:
            raise HealError(f"--method {self.method!r}: one of {', '.join(METHODS)}")
        if self.teacher not in TEACHERS:
            raise HealError(f"--teacher {self.teacher!r}: one of {', '.join(TEACHERS)}")
        unknown = [t for t in self.targets if t not in TARGET_PARTS]
        if unknown or not self.targets:
            raise HealError(
                f"--targets {','.join(self.targets)}: a comma-separated subset of "
                f"{','.join(TARGET_PARTS)}"
            )
        for name, value, least in (
            ("--r", self.r, 1),
            ("--batch", self.batch, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--seqlen", self.seqlen, 2),
            ("--warmup", self.warmup, 0),
            ("--save-every", self.save_every, 0),
            ("--teacher-topk", self.teacher_topk, 0),
            ("--eval-limit", self.eval_limit, 0),
        ):
            if value < least:
                raise HealError(f"{name} must be a whole number of at least {least}, got {value}")
        if self.max_windows is not None and self.max_windows < 1:
            raise HealError(
                f"--max-windows must be at least 1, got {self.max_windows} "
                "(leave it out to train on every window)"
            )
        for name, value, example in (
            ("--lr", self.lr, "1e-3"),
            ("--epochs", self.epochs, "2, or 0.5 for half a pass"),
            ("--alpha", self.alpha, "16"),
            ("--temperature", self.temperature, "1"),
        ):
            if not (math.isfinite(value) and value > 0):
                raise HealError(
                    f"{name} must be a positive finite number (e.g. {example}), got {value}"
                )
        if not self.max_grad_norm > 0:  # inf is allowed: no clipping
            raise HealError(
                f"--max-grad-norm must be positive (inf: no clipping), got {self.max_grad_norm}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise HealError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise HealError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        device_ok(self.device)


def depth_bundles(bundles: tuple[str, ...]) -> tuple[str, ...]:
    """The bundles that hold whole layers, in restore order (`_width` is not a stage)."""
    return tuple(b for b in bundles if not b.startswith("_"))


def stages_ok(stages: tuple[str, ...], bundles: tuple[str, ...]) -> None:
    """Stages are A, then bundles in the order restore puts them back, none skipped."""
    layers = depth_bundles(bundles)
    want = ("A", *layers)
    if not stages or stages != want[: len(stages)]:
        have = ",".join(want)
        raise HealError(
            f"--stages {','.join(stages)}: stages start at A and follow the bundles in order "
            f"without gaps (this output allows a prefix of {have})"
        )


def extras_installed(method: str) -> None:
    """peft (for LoRA) and matplotlib (the loss curves) are the `heal` extra: refused
    before anything is read when missing, naming the install that fixes it."""
    needed = ("peft", "matplotlib") if method == "lora" else ("matplotlib",)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise HealError(
            f"plancc heal needs {' and '.join(missing)}, which is not installed: "
            "pip install 'plancc[heal]'"
        )


def device_ok(device: str) -> None:
    """A device torch knows and this machine has (`cuda` without a GPU is refused here,
    not after the teacher and the data are loaded): `executor.device.check_device`."""
    try:
        check_device(device)
    except DeviceError as exc:
        raise HealError(f"--device {exc}") from None


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())
