"""`--device`, one option of five commands (`executor.device`)."""

from __future__ import annotations

import argparse

import pytest

from executor import device
from executor.device import DeviceError, check_device, device_type, resolve_device


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:1"])
def test_accepted_with_two_gpus(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _gpus(monkeypatch, 2)
    assert device_type(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("banana", "'banana' is not a device: use cpu, cuda or cuda:N"),
        ("CUDA", "'CUDA' is not a device: use cpu, cuda or cuda:N"),
        ("gpu", "'gpu' is not a device: use cpu, cuda or cuda:N"),
        ("cuda:", "'cuda:' is not a device: use cpu, cuda or cuda:N"),
        ("cuda:-1", "'cuda:-1' is not a device: use cpu, cuda or cuda:N"),
        ("cpu:0", "'cpu:0' is not a device: use cpu, cuda or cuda:N"),
        (" cpu", "' cpu' is not a device: use cpu, cuda or cuda:N"),
        ("mps", "'mps' is not a device: use cpu, cuda or cuda:N"),
        ("cuda:2", "cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"),
    ],
)
def test_refused_with_two_gpus(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    _gpus(monkeypatch, 2)
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        device_type(name)
    assert str(exc.value) == message


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_names_cpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _gpus(monkeypatch, 0)
    with pytest.raises(DeviceError) as exc:
        check_device(name)
    assert str(exc.value) == f"{name}: no CUDA device is visible here; use --device cpu"
    assert check_device("cpu") == "cpu"


@pytest.mark.parametrize(("gpus", "default"), [(0, "cpu"), (1, "cuda")])
def test_the_default_is_cuda_when_torch_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, default: str
) -> None:
    _gpus(monkeypatch, gpus)
    assert resolve_device(None) == default
    assert resolve_device("cpu") == "cpu"


def _parsers() -> dict[str, tuple[argparse.ArgumentParser, list[str]]]:
    from executor.cli import build_parser as plancc
    from plangen.cli import build_parser as plangen

    def sub(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    return {
        "plancc apply": (sub(plancc())["apply"], ["p.prn", "-o", "out"]),
        "plancc eval": (sub(plancc())["eval"], ["m"]),
        "plancc heal": (sub(plancc())["heal"], ["out", "-o", "healed"]),
        "plangen analyze": (sub(plangen())["analyze"], ["m", "-o", "p.prn"]),
        "plangen reconstruct": (sub(plangen())["reconstruct"], ["p.prn"]),
    }


@pytest.mark.parametrize(
    "command",
    ["plancc apply", "plancc eval", "plancc heal", "plangen analyze", "plangen reconstruct"],
)
def test_every_command_has_the_one_device_option(
    monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    parser, argv = _parsers()[command]
    (action,) = [a for a in parser._actions if "--device" in a.option_strings]
    assert action.type is device_type and action.default is None and action.choices is None
    assert action.help is not None and action.help.endswith(f"({device.DEFAULT_HELP})")
    assert parser.parse_args(argv).device is None  # resolved when the command runs
    _gpus(monkeypatch, 0)
    assert resolve_device(parser.parse_args(argv).device) == "cpu"
    assert parser.parse_args([*argv, "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--device", "banana"])
