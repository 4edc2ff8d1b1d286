"""`plangen analyze` under torchrun (gloo on the CPU): each process walks its share of
the batches, and the plan and sidecar are the single process's, byte for byte (the
plan's first line, which quotes the command, aside); only rank 0 writes and prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plangen.cli import main as plangen
from tests.helpers.layerwise import build
from tests.helpers.models import add_char_tokenizer
from tests.helpers.paths import ROOT

# 3 calibration batches and 3 held-out ones: 2 processes get uneven shares, and the
# judge's first round (one window) leaves a process with none.
SMALL = ["--nsamples", "3", "--seqlen", "32", "--heldout", "3", "--batch-size", "1", "--quiet"]


def _model(tmp_path: Path, family: str) -> Path:
    return add_char_tokenizer(build(tmp_path, family))


def _torchrun(procs: int, model: Path, plan: Path, *extra: str) -> str:
    """`python -m torch.distributed.run --nproc-per-node N -m plangen analyze ...`: stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={procs}", "-m", "plangen", "analyze", str(model)]
    command += ["-o", str(plan), *SMALL, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _same_outputs(one: Path, many: Path) -> None:
    """The plans less their first line (the command quoted), the sidecars byte for byte."""
    assert one.read_text().partition("\n")[2] == many.read_text().partition("\n")[2]
    side = lambda p: p.with_name(p.name.removesuffix(".prn") + ".scores.safetensors")  # noqa: E731
    assert side(one).read_bytes() == side(many).read_bytes()


def _check(tmp_path: Path, family: str, procs: int, *extra: str) -> None:
    model = _model(tmp_path, family)
    one = tmp_path / "one" / "p.prn"
    assert plangen(["analyze", str(model), "-o", str(one), *SMALL, *extra]) == 0
    many = tmp_path / "many" / "p.prn"
    out = _torchrun(procs, model, many, *extra)
    _same_outputs(one, many)
    # Rank 0 alone wrote (no temporary file or state cache of another rank left) and printed.
    assert sorted(p.name for p in many.parent.iterdir()) == ["p.prn", "p.scores.safetensors"]
    assert out.count(f"plan     {many}") == 1


@pytest.mark.slow
def test_gradients_fisher_and_residual_reconstruction_on_two_processes(tmp_path: Path) -> None:
    """The reverse sweep's gradient sums and Fisher term, the input moments and depth
    statistics, the residual reconstruction's Grams and the judge's losses, on uneven
    shares: the reconstructed tables in the sidecar equal the single process's."""
    extra = ["--strategy", "global", "--metric", "taylor2", "--target-params", "0.7"]
    _check(tmp_path, "llama", 2, *extra, "--reconstruct", "--reconstruct-mode", "residual")


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--strategy", "global", "--metric", "taylor2", "--target-params", "0.7"]],
    ids=["auto", "taylor2"],
)
def test_sharded_layers_on_two_processes(tmp_path: Path, extra: list[str]) -> None:
    """--shard-layers: the gradient pass runs every batch on every process with each
    layer's projections sharded (FSDP2), the rest of the run split as usual; the
    gradient tables (Taylor, Fisher), the reconstruction and the plan chosen from them
    are the single process's."""
    model = _model(tmp_path, "qwen2")
    one = tmp_path / "one" / "p.prn"
    assert plangen(["analyze", str(model), "-o", str(one), *SMALL, *extra]) == 0
    many = tmp_path / "many" / "p.prn"
    _torchrun(2, model, many, *extra, "--shard-layers")
    _same_outputs(one, many)


def test_shard_layers_needs_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _model(tmp_path, "llama")
    plan = tmp_path / "p.prn"
    assert plangen(["analyze", str(model), "-o", str(plan), *SMALL, "--shard-layers"]) != 0
    err = capsys.readouterr().err
    assert "--shard-layers shards each decoder layer across torchrun's processes" in err
    assert "torchrun --nproc-per-node N" in err
    assert not plan.exists()


@pytest.mark.slow
def test_auto_on_three_processes(tmp_path: Path) -> None:
    """The default dense analysis (every metric, the sequential reconstruction of the
    OBS candidates, successive halving) on three processes, one batch each."""
    _check(tmp_path, "llama", 3)


@pytest.mark.slow
def test_moe_on_two_processes(tmp_path: Path) -> None:
    """A MoE model: router statistics and NAEE walk every window on every process; the
    probes and the judge are split."""
    _check(tmp_path, "qwen2_moe", 2)


COUNTS = (1, 5)  # batches: fewer than the processes, and more (uneven shares)


def _parts(n: int) -> list[torch.Tensor]:
    return [torch.randn(5, 3, generator=torch.Generator().manual_seed(b)) for b in range(n)]


def _ring_worker(rank: int, world: int, port: int, out: str) -> None:
    from executor import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    shard = distributed.Shard(rank, world, torch.device("cpu"))
    got = []
    for n in COUNTS:
        parts, ring = _parts(n), distributed.Ring(shard)
        for b in shard.mine(n):
            ring.add(b, n, [parts[b]])
        (total,) = ring.result()
        got.append((total, shard.gathered([float(parts[b].sum()) for b in shard.mine(n)])))
    torch.save(got, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_ring_sums_in_global_batch_order(tmp_path: Path) -> None:
    """`Ring` gives every process the left-to-right sum over batches (bit for bit, not
    an all_reduce's order), also to a process that held no batch; `gathered` lists the
    items in global batch order."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 3
    out = str(tmp_path / "r")
    torch.multiprocessing.spawn(_ring_worker, (world, port, out), nprocs=world)
    for rank in range(world):
        for n, (total, order) in zip(COUNTS, torch.load(f"{out}.{rank}"), strict=True):
            parts = _parts(n)
            expected = parts[0]
            for p in parts[1:]:
                expected = expected + p
            assert torch.equal(total, expected)
            assert order == [float(p.sum()) for p in parts]
