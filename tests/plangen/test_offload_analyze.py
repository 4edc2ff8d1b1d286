"""`plangen analyze --offload` end to end: the same plan and sidecar as in memory, one
decoder layer at a time; chosen by itself when the model does not fit (a checkpoint
larger than the process's memory limit); and an interrupted layer-wise run (Ctrl-C,
kill -9) leaves no plan, no sidecar, and no state cache after the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plangen.cli import main as plangen
from tests.helpers.layerwise import SMALL_8B_LIKE, build
from tests.helpers.models import add_char_tokenizer
from tests.helpers.paths import ROOT

SMALL = ["--nsamples", "4", "--seqlen", "32", "--heldout", "2", "--batch-size", "2"]
DENSE = ("llama", "qwen2", "gemma3_text", "phi3")
MOE = ("qwen2_moe", "deepseek_v3")


def _model(tmp_path: Path, family: str, **over: object) -> Path:
    return add_char_tokenizer(build(tmp_path, family, **over))


def _analyze(model: Path, plan: Path, *extra: str) -> None:
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--quiet", *extra]) == 0


def _without_command(plan: Path) -> str:
    """The plan without its first line, which quotes the command (and so --offload);
    the plans compared have the same name (the plan names its sidecar)."""
    first, _, rest = plan.read_text().partition("\n")
    assert first.startswith("# written by: plangen analyze ")
    return rest


def _same_outputs(a: Path, b: Path) -> None:
    assert _without_command(a) == _without_command(b)
    side = lambda p: p.with_name(p.name.removesuffix(".prn") + ".scores.safetensors")  # noqa: E731
    assert side(a).read_bytes() == side(b).read_bytes()


@pytest.mark.parametrize("family", DENSE + MOE)
def test_offload_writes_the_plan_and_sidecar_of_the_in_memory_run(
    tmp_path: Path, family: str
) -> None:
    """Every family, its default analysis (dense: `auto` with its reconstructed
    candidates; MoE: the expert candidates), layer by layer against in memory."""
    model = _model(tmp_path, family)
    _analyze(model, tmp_path / "memory" / "p.prn")
    _analyze(model, tmp_path / "offload" / "p.prn", "--offload")
    _same_outputs(tmp_path / "memory" / "p.prn", tmp_path / "offload" / "p.prn")


@pytest.mark.parametrize(
    "extra",
    [
        ["--strategy", "depth", "--metric", "removal"],
        ["--strategy", "unbalanced", "--importance", "removal", "--metric", "taylor2"],
        ["--metric", "obs"],
        ["--target-params", "0.7", "--reconstruct", "--reconstruct-mode", "residual"],
    ],
    ids=["removal", "taylor2", "obs", "residual"],
)
def test_offload_equals_in_memory_for_the_other_measurements(
    tmp_path: Path, extra: list[str]
) -> None:
    model = _model(tmp_path, "qwen2")
    _analyze(model, tmp_path / "memory" / "p.prn", *extra)
    _analyze(model, tmp_path / "offload" / "p.prn", "--offload", *extra)
    _same_outputs(tmp_path / "memory" / "p.prn", tmp_path / "offload" / "p.prn")


def test_offload_with_states_on_disk_leaves_no_cache(tmp_path: Path) -> None:
    model, states = _model(tmp_path, "llama"), tmp_path / "states"
    _analyze(model, tmp_path / "memory" / "p.prn")
    _analyze(model, tmp_path / "disk" / "p.prn", "--offload", str(states))
    _same_outputs(tmp_path / "memory" / "p.prn", tmp_path / "disk" / "p.prn")
    assert states.is_dir() and not any(states.iterdir())


def test_moe_offload_with_naee_and_allocation(tmp_path: Path) -> None:
    model = _model(tmp_path, "qwen2_moe")
    extra = ["--drop-experts", "0.5", "--metric", "naee"]
    _analyze(model, tmp_path / "memory" / "p.prn", *extra)
    _analyze(model, tmp_path / "offload" / "p.prn", "--offload", *extra)
    _same_outputs(tmp_path / "memory" / "p.prn", tmp_path / "offload" / "p.prn")


# ---- interrupted runs ----------------------------------------------------------------


def _start(model: Path, plan: Path, states: Path) -> subprocess.Popen[str]:
    """A layer-wise analysis long enough to be caught in its walk."""
    many = ["--nsamples", "48", "--seqlen", "64", "--heldout", "4", "--batch-size", "1"]
    args = ["analyze", str(model), "-o", str(plan), *many, "--offload", str(states), "--quiet"]
    return subprocess.Popen(
        [sys.executable, "-m", "plangen", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _caught_walking(proc: subprocess.Popen[str], states: Path) -> None:
    deadline = time.monotonic() + 120
    while not (states.is_dir() and any(states.glob(f"plancc-walk-{proc.pid}-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "never started walking"
        time.sleep(0.02)


@pytest.mark.slow  # two subprocesses on a walk of 48 windows: 20-40 s
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_layerwise_run_leaves_nothing(tmp_path: Path, how: int) -> None:
    model, plan, states = _model(tmp_path, "llama"), tmp_path / "out" / "p.prn", tmp_path / "s"
    proc = _start(model, plan, states)
    try:
        _caught_walking(proc, states)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == signal.SIGINT:
        assert proc.returncode == 130, err
        assert not any(states.iterdir())  # the walk's cache removed on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
        assert list(states.glob(f"plancc-walk-{proc.pid}-*"))  # left behind: nobody ran
    assert not plan.exists() and not plan.with_name("p.scores.safetensors").exists()
    assert not (plan.parent.exists() and [p for p in plan.parent.iterdir() if p.is_file()])
    _analyze(model, plan, "--offload", str(states))  # the next run to the same cache
    assert plan.is_file() and not any(states.iterdir())


# ---- larger than memory --------------------------------------------------------------

# SMALL_8B_LIKE: ~125 MB bf16 per layer; eight layers and the head: a 1.0 GB checkpoint.
DATA_LIMIT = 900_000_000


def _limited() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


@pytest.mark.slow  # writes 1.0 GB; a layer-wise analysis of eight 125 MB layers: ~1 min
def test_a_checkpoint_larger_than_the_memory_limit_is_analyzed_layer_by_layer(
    tmp_path: Path,
) -> None:
    """Under RLIMIT_DATA = 0.90 GB (heap and private maps), a 1.0 GB bf16 checkpoint:
    analyze sees the limit, says it walks the model one layer at a time, and writes
    a plan that checks."""
    from compiler.check import check_file
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model(
        tmp_path, "llama", dtype="bfloat16", num_hidden_layers=8, **SMALL_8B_LIKE
    )
    model = add_char_tokenizer(model)
    assert sum(f.stat().st_size for f in model.glob("*.safetensors")) > DATA_LIMIT
    plan = tmp_path / "p.prn"
    args = ["analyze", str(model), "-o", str(plan), "--strategy", "flap", "--dtype", "bfloat16"]
    args += ["--nsamples", "2", "--seqlen", "32", "--heldout", "2", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "plangen", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        preexec_fn=_limited,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "one decoder layer at a time (--offload" in done.stderr
    assert "ulimit" in done.stderr
    assert check_file(plan).ok
