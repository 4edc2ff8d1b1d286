"""The device a command runs on when `--device` is not given."""

from __future__ import annotations


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
