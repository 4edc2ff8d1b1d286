"""Where `plangen analyze` runs the model (`plangen.memory.placement`): whole in memory
when the estimate fits, one decoder layer at a time when only that fits (said), an
error naming the way out when neither does; `--offload` and `--no-memory-check`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plangen import memory
from plangen.memory import DoesNotFit, Footprint, Placement, placement

# MemFree 284 MB, MemAvailable 10.7 GB (10.2 GiB): the kernel can give the latter.
MEMINFO = "MemTotal: 16000000 kB\nMemFree: 284000 kB\nMemAvailable: 10700000 kB\n"
GIB = 2**30


@pytest.fixture
def fake_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    free_pages = 284_000 * 1024 // 4096  # what SC_AVPHYS_PAGES says: MemFree only
    monkeypatch.setattr(
        os, "sysconf", lambda name: free_pages if name == "SC_AVPHYS_PAGES" else 4096
    )
    monkeypatch.delenv(memory.MEMORY_CHECK_ENV, raising=False)


def _footprint(params: int, layers: int = 32, hidden: int = 4096) -> Footprint:
    """A model of `params` elements: 10% embedding/head, the rest in equal layers."""
    outside = params // 10
    return Footprint(params, (params - outside) // layers, outside, hidden, layers)


def _place(fp: Footprint, gradients: bool = False, **kw) -> Placement:
    args = {"offload": None, "memory_check": True, "device": "cpu", "dtype": "float32"}
    args.update(kw)
    return placement(footprint=fp, tokens=32 * 512, gradients=gradients, **args)


def test_a_model_that_fits_what_the_kernel_can_give_runs_in_memory(fake_memory) -> None:
    """MemFree is 284 MB, MemAvailable 10.7 GB: 513 MiB of weights fit."""
    assert _place(_footprint(513 * 2**20 // 4)) == Placement(False)


def test_a_model_that_does_not_fit_is_walked_layer_by_layer_and_said(fake_memory) -> None:
    got = _place(_footprint(20 * GIB // 4))  # 20 GiB of float32 weights
    assert got.layerwise and got.states == "host"
    assert got.said is not None
    assert "needs about 20.0 GiB on cpu (weights, float32)" in got.said
    assert "only 10.2 GiB memory available (MemAvailable)" in got.said
    assert "one decoder layer at a time (--offload" in got.said


def test_the_state_cache_on_disk_is_advised_when_only_that_fits(fake_memory) -> None:
    # 64 layers of gradient boundaries of 16k tokens x 8192 x 4 bytes: 34 GiB of states.
    with pytest.raises(DoesNotFit) as exc:
        _place(_footprint(20 * GIB // 4, layers=64, hidden=8192), gradients=True)
    message = str(exc.value)
    assert "even one decoder layer at a time" in message
    assert "--offload DIR (the 32.5 GiB of states between layers on disk under DIR)" in message
    assert "--no-memory-check" in message and "PLANCC_NO_MEMORY_CHECK=1" in message


def test_a_model_whose_one_layer_does_not_fit_is_refused(fake_memory) -> None:
    with pytest.raises(DoesNotFit, match=r"even one decoder layer .* use --dtype bfloat16, "):
        _place(_footprint(2000 * GIB // 4, layers=8))


def test_offload_and_the_override_decide_without_an_estimate(fake_memory, tmp_path) -> None:
    huge = _footprint(2000 * GIB // 4, layers=8)
    assert _place(huge, offload="") == Placement(True, "host")
    assert _place(huge, offload=str(tmp_path)) == Placement(True, tmp_path)
    assert _place(huge, memory_check=False) == Placement(False)


def test_a_layer_whose_backward_fits_only_sharded_is_sharded_under_torchrun(fake_memory) -> None:
    # 4 layers of 1 Gi elements: a layer's weights, gradient sums and one batch's
    # gradients in float32 are 12 GiB; on 4 processes 3 GiB each (+ embedding, states).
    fp = _footprint(4 * GIB * 10 // 9, layers=4)
    with pytest.raises(DoesNotFit, match="even one decoder layer at a time"):
        _place(fp, gradients=True)
    got = _place(fp, gradients=True, world=4)
    assert got.layerwise and got.sharded and got.states == "host"
    assert got.said is not None
    assert "each sharded across the 4 processes for the gradient pass (--shard-layers" in got.said
    # Without a gradient pass one layer fits: no sharding.
    assert not _place(fp, world=4).sharded


def test_shard_layers_implies_the_layerwise_walk(fake_memory, tmp_path: Path) -> None:
    tiny = _footprint(1000)
    assert _place(tiny, shard=True, world=2) == Placement(True, "host", sharded=True)
    assert _place(tiny, shard=True, offload=str(tmp_path)) == Placement(
        True, tmp_path, sharded=True
    )


def test_the_environment_override(fake_memory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory.MEMORY_CHECK_ENV, "1")
    assert _place(_footprint(2000 * GIB // 4, layers=8)) == Placement(False)


def test_the_footprint_of_smollm2_is_read_from_the_headers(smollm2_dir: Path) -> None:
    from compiler.checkpoint import load_checkpoint_facts

    fp = Footprint.of(load_checkpoint_facts(smollm2_dir))
    # 30 layers of 576 wide: q 576x576, k/v 192x576 each, o 576x576, gate/up/down
    # 1536x576 each, two norms of 576.
    per_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576 + 2 * 576
    assert (fp.layers, fp.hidden, fp.largest_layer) == (30, 576, per_layer)
    assert fp.outside == 49152 * 576  # the tied embedding (the final norm is smaller)
    assert fp.params == 30 * per_layer + 49152 * 576 + 576
    assert fp.largest_tensor == 1536 * 576


def test_a_killed_runs_state_caches_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    from executor.layerwise import CACHE_PREFIX, StateCache
    from plangen.staging import remove_stale_caches

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = tmp_path / f"{CACHE_PREFIX}{int(gone.stdout)}-abc123"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "0.st").write_bytes(b"x")
    live = StateCache(directory=tmp_path)  # this process's own
    other = tmp_path / f"{CACHE_PREFIX}notapid-x"  # not named by a pid: not ours to judge
    other.mkdir()
    unrelated = tmp_path / "plancc-walk-1"  # no random part
    unrelated.write_text("keep")
    assert remove_stale_caches(tmp_path) == [dead]
    assert not dead.exists() and live.directory is not None and live.directory.is_dir()
    assert other.is_dir() and unrelated.read_text() == "keep"
    live.close()
    assert not any(tmp_path.glob(f"{CACHE_PREFIX}{os.getpid()}-*"))


def test_offload_takes_an_optional_directory() -> None:
    from plangen.cli import build_parser
    from plangen.options import Options

    parser = build_parser()
    base = ["analyze", "m", "-o", "p.prn", "--device", "cpu"]
    assert Options.from_args(parser.parse_args(base)).offload is None
    assert Options.from_args(parser.parse_args([*base, "--offload"])).offload == ""
    assert Options.from_args(parser.parse_args([*base, "--offload", "/x"])).offload == "/x"


def test_a_process_limit_below_memavailable_is_what_is_free(
    fake_memory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import resource

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmSize:\t 9000000 kB\nVmData:\t  250000 kB\n")
    monkeypatch.setattr(memory, "STATUS", status)
    limits = {resource.RLIMIT_DATA: (700_000_000, resource.RLIM_INFINITY)}
    monkeypatch.setattr(
        resource, "getrlimit", lambda r: limits.get(r, (resource.RLIM_INFINITY,) * 2)
    )
    free, where = memory.free_memory("cpu")
    assert free == 700_000_000 - 250_000 * 1024
    assert where == "memory left under this process's limit (ulimit -d / -v)"
    got = _place(_footprint(600_000_000 // 4, layers=32, hidden=512))  # 0.6 GB of weights
    assert got.layerwise and got.said is not None and "ulimit -d" in got.said


def test_in_step_and_fused_are_chosen_by_what_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconstruction's batches in step and the fused gradient pass each hold more
    at once: taken when what is free holds it (their estimates), not otherwise, never
    with the states on disk (in step) or layer by layer (fused)."""
    from compiler.checkpoint import load_checkpoint_facts
    from executor.layerwise import LayerWalk
    from plangen.analyze import model_facts
    from plangen.calibrate import collect
    from tests.helpers.layerwise import build, token_windows

    model_dir = build(tmp_path, "llama")
    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    free = {"bytes": 64 << 30}
    monkeypatch.setattr(memory, "free_memory", lambda device: (free["bytes"], "test"))
    windows = token_windows()  # 5 x 40 tokens
    tokens = 5 * 40
    with LayerWalk.open(model_dir, resident=True, batch_size=2) as walk:
        parked = tokens * (6 * facts.hidden + 2 * facts.ffn) * 4
        per_token = (10 * facts.hidden + 6 * facts.ffn) * 4 + 4 * facts.heads * 40
        grads = sum(p.numel() for p in walk.layers.parameters()) * 4
        fused = 2 * 40 * facts.layers * per_token + grads
        for room, in_step, fuses in (
            (parked + memory.RUNTIME_BASE, True, False),
            (parked + memory.RUNTIME_BASE - 1, False, False),
            (fused + memory.RUNTIME_BASE, True, True),
        ):
            free["bytes"] = room
            assert memory.in_step_fits(walk, facts.hidden, facts.ffn, tokens) is in_step
            assert memory.fused_fits(walk, 2 * 40, 40) is fuses
            calib = collect(None, ck.arch, windows, gradients=True, progress=False, walk=walk)
            assert calib.fused is fuses
        assert not memory.fused_fits(walk, 2 * 40, 40, reserve=1)  # the Grams beside it
    free["bytes"] = 64 << 30
    with LayerWalk.open(model_dir, batch_size=2) as walk:  # layer by layer
        assert not memory.fused_fits(walk, 2 * 40, 40)
        assert memory.in_step_fits(walk, facts.hidden, facts.ffn, tokens)
    with LayerWalk.open(model_dir, batch_size=2, cache=tmp_path / "states") as walk:
        assert not memory.in_step_fits(walk, facts.hidden, facts.ffn, tokens)
