"""The reverse sweep with each layer sharded across processes (`executor.sharding`, FSDP2
on gloo) gives the single process's gradients bit for bit.

Every process runs every batch; each layer's projections (and a MoE layer's fused
experts) are FSDP units, sharded along their first axis. Per family, on 2 processes
(and 3 on two families: a float32 mean of three equal gradients could round, the
float64 reduction does not), each process's `on_batch` sees every batch's gradients,
gathered when read, in autograd's order, equal to the unsharded sweep's; `on_layer`
sees the sums over batches (sharded `.grad`, gathered) and the weights equal to the
unsharded sweep's; the loss is the same; the skeleton is back on meta after.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from executor import sharding
from executor.layerwise import LayerWalk
from tests.helpers.layerwise import FAMILIES, build, on_meta, token_windows

BATCH = 2  # five windows: batches of 2, 2 and 1

Record = dict[str, object]


def _record(walk: LayerWalk, wants: object, per_batch: bool = True) -> Record:
    """What the sweep hands its callbacks: per batch the gradients in the order given
    (unless not `per_batch`: then no `on_batch`, and the sums are FSDP's own),
    per layer the summed gradients and weights (gathered where sharded)."""
    batches: list[tuple[int, int, list[str], list[torch.Tensor]]] = []
    layers: dict[str, torch.Tensor] = {}
    sharded: list[bool] = []

    def on_batch(i: int, k: int, _module: torch.nn.Module, grads: dict) -> None:
        names = list(grads)
        batches.append((i, k, names, [grads[n].clone() for n in names]))

    def on_layer(i: int, module: torch.nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        sharded.append(any(isinstance(p, DTensor) for p in module.parameters()))
        for name, p in module.named_parameters():
            layers[f"{i}.{name}.weight"] = sharding.full(p.detach()).clone()
            if p.grad is not None:
                layers[f"{i}.{name}.grad"] = sharding.full(p.grad).clone()

    loss = walk.backward_sweep(
        token_windows(), on_layer, on_batch=on_batch if per_batch else None, wants=wants
    )
    return {"loss": loss, "batches": batches, "layers": layers, "sharded": sharded}


def _only_projections(_i: int, name: str) -> bool:
    """Calibration's choice: the projections' weights and biases, no norm, no expert."""
    return "proj" in name and "experts" not in name


# (wants: calibration's projections only, on_batch given)
VARIANTS = ((False, True), (True, True), (True, False))


def _cases(families: tuple[str, ...]) -> list[tuple[str, bool, bool]]:
    return [(f, picked, per_batch) for f in families for picked, per_batch in VARIANTS]


def _worker(rank: int, world: int, port: int, root: str, families: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = []
        for family, picked, per_batch in _cases(families):
            with LayerWalk.open(Path(root) / family, batch_size=BATCH, shard_layers=True) as walk:
                got = _record(walk, _only_projections if picked else None, per_batch)
                got["meta"] = on_meta(walk.model)
            out.append(got)
        torch.save(out, f"{root}/sharded.{world}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(root: Path, world: int, families: tuple[str, ...]) -> None:
    for f in families:
        assert build(root, f) == root / f
    torch.multiprocessing.spawn(_worker, (world, _free_port(), str(root), families), nprocs=world)
    for n, (family, picked, per_batch) in enumerate(_cases(families)):
        with LayerWalk.open(root / family, batch_size=BATCH) as walk:
            want = _record(walk, _only_projections if picked else None, per_batch)
        for rank in range(world):
            got = torch.load(f"{root}/sharded.{world}.{rank}")[n]
            case = f"{family}, rank {rank}, {'projections' if picked else 'all'}, {per_batch}"
            assert got["meta"] and got["sharded"] == [True, True], case
            assert want["sharded"] == [False, False]
            assert got["loss"] == want["loss"], case
            assert len(got["batches"]) == len(want["batches"]) == 2 * 3 * per_batch, case
            for (i, k, names, grads), (wi, wk, wnames, wgrads) in zip(
                got["batches"], want["batches"], strict=True
            ):
                assert (i, k, names) == (wi, wk, wnames), case
                for name, g, w in zip(names, grads, wgrads, strict=True):
                    assert torch.equal(g, w), f"{case}: layer {i} batch {k} {name}"
            assert sorted(got["layers"]) == sorted(want["layers"]), case
            for key, w in want["layers"].items():
                assert torch.equal(got["layers"][key], w), f"{case}: {key}"
        # Not vacuous: the gradients asked for are there, and nonzero.
        grads = [k for k in want["layers"] if k.endswith(".grad")]
        assert grads and all(want["layers"][k].abs().sum() > 0 for k in grads if "proj" in k)
        assert any("norm" in k for k in grads) != picked


@pytest.mark.slow
def test_sharded_sweep_on_two_processes(tmp_path: Path) -> None:
    _check(tmp_path, 2, FAMILIES)


@pytest.mark.slow
def test_sharded_sweep_on_three_processes(tmp_path: Path) -> None:
    """Three processes: uneven shards (padding), and a mean of three equal gradients."""
    _check(tmp_path, 3, ("qwen2", "qwen2_moe"))


def test_units_are_the_modules_that_own_a_matrix(tmp_path: Path) -> None:
    """A Llama layer's units: its seven projections, deepest first; the norms are not."""
    with LayerWalk.open(build(tmp_path, "llama"), batch_size=BATCH) as walk:
        layer = walk.layers[0]
        names = {id(m): n for n, m in layer.named_modules()}
        got = [names[id(m)] for m in sharding.units(layer)]
    assert sorted(got) == sorted(
        f"{p}.{n}"
        for p, ns in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for n in (f"{x}_proj" for x in ns)
    )


def test_gathered_reads_plain_tensors_as_they_are() -> None:
    t = torch.arange(6.0)
    g = sharding.Gathered({"a": t})
    assert g["a"] is t and list(g) == ["a"] and len(g) == 1 and "a" in g and "b" not in g
    assert g.get("b") is None


def test_sharding_needs_the_layerwise_walk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the layer-wise walk"):
        LayerWalk.open(build(tmp_path, "llama"), resident=True, shard_layers=True)
