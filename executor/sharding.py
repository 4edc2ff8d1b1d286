"""One decoder layer sharded across torchrun's processes for the reverse sweep (FSDP2).

The reverse sweep (`executor.layerwise.LayerWalk.backward_sweep`) holds one layer, its
gradient sums, one batch's gradients and one batch's activations at a time. Where even
that does not fit one device (a 70B model's layer in float32, an MoE layer with many
experts), `torch.distributed.fsdp.fully_shard` splits the layer across the processes:
each module that owns a matrix (every projection, a fused experts module) becomes a unit
whose parameters and gradients are sharded along their first axis, gathered for that
unit's forward and backward only and sharded again after. No home-made scheduler:
FSDP2's own all-gather and reduce-scatter.

Exactness, so that the plan and sidecar stay the single process's byte for byte:

- Every process runs every batch in the sharded sweep (`distributed.whole`): each
  computes the same unsharded gradient of a unit, so the reduce-scatter that FSDP
  would run (a mean of N equal values, which in float32 can round for N = 3) is
  replaced by what it stands for: each process keeps its own chunk of the gradient
  it computed (`OwnChunk`, FSDP2's `set_custom_reduce_scatter`). No arithmetic and
  no transfer: every shard is the single process's gradient, bit for bit, for any
  number of processes.
- The gradient sums over batches are the single process's: each batch's sharded
  gradient is added to the sum of the batches before it, element by element, in
  batch order (the walk stashes the running sum before the batch's backward).
- `on_batch` gets the gradients in autograd's order, the order a full model's backward
  computes them (the Fisher term's float sums follow it): `AutogradOrder` puts a hook
  on each unit's gathered parameters as its forward begins.
- What reads a whole weight or gradient (`Gathered`) gathers it when asked, one tensor
  at a time, and the same on every process: every process runs the same code on the
  same values, so the collectives line up.

The memory it saves is the layer's parameters and gradients divided by the process
count, less one unit's gathered copy; the activations of one batch are every
process's (all run every batch). A fused experts tensor is one unit: gathered whole
for its forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# The type FSDP2's public `set_custom_reduce_scatter` takes (transformers imports the
# module anyway).
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter


def active() -> bool:
    """Whether several processes have joined a group a layer can be sharded across."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@functools.cache
def _mesh(device_type: str, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def mesh(device: torch.device) -> Any:
    """The one-dimensional device mesh over every process of the group."""
    import torch.distributed as dist

    return _mesh(device.type, dist.get_world_size())


def units(layer: nn.Module) -> list[nn.Module]:
    """The layer's modules that own a matrix (a parameter of two or more axes), deepest
    first: each becomes one FSDP unit (a projection with its bias, an experts module)."""
    found = [
        m
        for m in layer.modules()
        if any(p is not None and p.dim() >= 2 for p in m._parameters.values())
    ]
    return list(reversed(found))


def shard_layer(
    layer: nn.Module,
    wanted: Callable[[str], bool],
    device: torch.device,
    load: Callable[[Sequence[str], torch.device], None],
) -> list[nn.Module]:
    """Load a decoder layer (its skeleton, on meta) one unit at a time and shard each
    unit across the group as soon as it is loaded (FSDP2 `fully_shard`, resharded
    after each forward, each process keeping its chunk of its own gradient: see the
    module docstring), so that no more than one unit is ever whole. `load(slots,
    device)` materializes those of the layer's parameters and buffers (names as in
    its `state_dict`). The parameters `wanted` does not pick get no gradient. The
    rest (the norms) is loaded whole on every process, on `device`. Returns the
    units."""
    from torch.distributed.fsdp import fully_shard

    for name, p in layer.named_parameters():
        p.requires_grad_(wanted(name))
    names = {id(m): n for n, m in layer.named_modules()}
    pending = list(layer.state_dict(keep_vars=True))
    out = units(layer)
    for unit in out:
        prefix = names[id(unit)] + "." if names[id(unit)] else ""
        mine = [s for s in pending if s.startswith(prefix)]
        pending = [s for s in pending if not s.startswith(prefix)]
        load(mine, torch.device("cpu"))
        fully_shard(unit, mesh=mesh(device), reshard_after_forward=True)
        unit.set_custom_reduce_scatter(OwnChunk())  # type: ignore[operator]
    load(pending, device)
    return out


class OwnChunk(ReduceScatter):
    """FSDP's gradient reduce-scatter where every process computed the same gradient:
    this process's chunk of its own (the mean of N equal values is the value), copied;
    nothing sent, nothing added."""

    def allocate(
        self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        op: Any,
        async_op: bool = False,
    ) -> None:
        import torch.distributed as dist

        n = output_tensor.numel()
        start = dist.get_rank(group) * n
        output_tensor.copy_(input_tensor.reshape(-1)[start : start + n])


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process calls it), or the
    tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Gathered(Mapping[str, torch.Tensor]):
    """Tensors by name, each gathered whole when read (`full`): one at a time, never
    kept. Reading a key is a collective when its tensor is sharded."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return full(self._tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors


class AutogradOrder:
    """The order in which autograd computes the gradients of a sharded layer's
    parameters, batch by batch: a forward pre-hook on each unit (run after FSDP's own,
    which gathers the unit) puts a tensor hook on each gathered parameter that records
    its name when its gradient is computed; parameters outside the units are hooked
    directly. Names are the layer's own (`named_parameters`)."""

    def __init__(self, layer: nn.Module, units: list[nn.Module], wanted: set[str]):
        self.order: list[str] = []
        self._per_batch: list[Any] = []
        self._handles: list[Any] = []
        prefix = {id(m): n + "." if n else "" for n, m in layer.named_modules()}
        in_units = set()
        for unit in units:
            names = [prefix[id(unit)] + n for n, _ in unit.named_parameters(recurse=False)]
            in_units.update(names)
            hook = functools.partial(self._gathered, names, wanted)
            self._handles.append(unit.register_forward_pre_hook(hook))
        for name, p in layer.named_parameters():
            if name not in in_units and name in wanted:
                self._handles.append(p.register_hook(functools.partial(self._note, name)))

    def _note(self, name: str, _grad: torch.Tensor) -> None:
        self.order.append(name)

    def _gathered(self, names: list[str], wanted: set[str], unit: nn.Module, _args: Any) -> None:
        for name, (_, p) in zip(names, unit.named_parameters(recurse=False), strict=True):
            if name in wanted and p.requires_grad:
                self._per_batch.append(p.register_hook(functools.partial(self._note, name)))

    @contextlib.contextmanager
    def batch(self) -> Iterator[list[str]]:
        """One batch's forward and backward: yields the list the names fill, in order."""
        self.order = []
        try:
            yield self.order
        finally:
            for h in self._per_batch:
                h.remove()
            self._per_batch.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
