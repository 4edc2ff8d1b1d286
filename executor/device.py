"""`--device`: one definition for every command that computes with torch.

`plancc apply`, `eval` and `heal` and `plangen analyze` and `reconstruct` take the
same option: `cpu`, `cuda` or `cuda:N`, refused by argparse otherwise, and by
default cuda when torch sees a GPU, else cpu. The default is resolved when the
command runs (`resolve_device`), not when the parser is built, so `--help` does
not import torch.
"""

from __future__ import annotations

import argparse
import re

DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")
DEFAULT_HELP = "default: cuda when torch sees a GPU, else cpu"


class DeviceError(ValueError):
    """A device name that is not cpu / cuda / cuda:N, or a GPU this machine lacks."""


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(text: str) -> str:
    """`text` when it names a device this machine has; DeviceError (one line that
    names the fix) otherwise. torch is imported only for a cuda device."""
    match = DEVICE.fullmatch(text)
    if match is None:
        raise DeviceError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    if text == "cpu":
        return text
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"{text}: no CUDA device is visible here; use --device cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise DeviceError(f"{text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return text


def device_type(text: str) -> str:
    """`check_device` as an argparse `type=`: a refusal is a usage error."""
    try:
        return check_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_device(device: str | None) -> str:
    """The device a command runs on: the one given, else `default_device()`."""
    return default_device() if device is None else device


def device_help(used_for: str) -> str:
    """The help text of `--device`: what it is used for, the values, the default."""
    return f"{used_for}: cpu, cuda or cuda:N ({DEFAULT_HELP})"


def device_argument(used_for: str) -> dict[str, object]:
    """The keyword arguments of `--device` for `add_argument` (default None: resolved
    with `resolve_device` when the command runs)."""
    return {"type": device_type, "default": None, "help": device_help(used_for)}


def add_device_argument(parser: argparse._ActionsContainer, used_for: str) -> None:
    """Add `--device` to a parser or an argument group."""
    parser.add_argument("--device", **device_argument(used_for))  # type: ignore[arg-type]
