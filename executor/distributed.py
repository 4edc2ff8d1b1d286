"""Data parallelism under torchrun: which batches this process walks, and the sums over
batches combined across processes in the order one process adds them, bit for bit.

`torchrun --nproc-per-node N -m plangen analyze ...` starts N processes; `start` joins
them (gloo on the CPU, nccl on CUDA, each process on `cuda:LOCAL_RANK`) and makes this
process's `Shard` the current one. The split is decided here once (`Shard.mine`):
the walk (`executor.layerwise.LayerWalk.inputs`) cuts the windows into batches as one
process would, and keeps batches rank, rank + N, rank + 2N, ... (round robin: every
process has a share of every stretch of the windows, and a running sum can go round
the processes batch by batch, below). Shares need not be equal; a process may have
none.

A float sum depends on its order: an `all_reduce` of per-process partial sums is not
the single process's sum. So each sum over batches is formed in global batch order:

- small per-batch values (losses, input moments, depth statistics, the Fisher term
  folded per unit): every process's are gathered (`Shard.gathered`) and added in
  global batch order on every process. Memory: one item per batch, of vector size.
- large per-batch tensors (a layer's gradients, a projection's Gram matrix): the
  running sum goes round the processes (`Ring`): the process of batch b receives the
  sum of batches < b from the process of batch b - 1, adds its own and passes it on;
  the process of the last batch then broadcasts the total. Memory: the running sum
  and one batch's tensor, as in one process; the batches' compute runs in parallel,
  only the additions and transfers go in turn (one transfer of the sum per batch).

Whatever is solved from these sums (scores, least-squares solves) is then the same
on every process, computed from identical inputs by identical code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Add = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` processes walking one set of windows."""

    rank: int
    world: int
    device: torch.device  # where collectives put their small tensors (nccl: the GPU)

    def mine(self, n: int) -> range:
        """The global indices of this process's batches of n: round robin."""
        return range(self.rank, n, self.world)

    def holder(self, b: int) -> int:
        """The process that walks batch b."""
        return b % self.world

    def total(self, local: int) -> int:
        """The number of batches all processes walk together (`local` of them here)."""
        t = torch.tensor([local], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def gathered(self, local: Sequence[T]) -> list[T]:
        """Every process's per-batch items (this one's: `local`, in its batch order) in
        global batch order, on every process."""
        parts: list[list[T] | None] = [None] * self.world
        torch.distributed.all_gather_object(parts, list(local))
        n = sum(len(p or []) for p in parts)
        return [parts[self.holder(b)][b // self.world] for b in range(n)]  # type: ignore[index]


_CURRENT: ContextVar[Shard | None] = ContextVar("plancc_shard", default=None)
# The batch a walk is running now, when its windows are split: (global index, batches).
_RUNNING: ContextVar[tuple[int, int] | None] = ContextVar("plancc_batch", default=None)


def current() -> Shard | None:
    """The shard the walks of this process take (None: one process, every batch)."""
    return _CURRENT.get()


@contextlib.contextmanager
def whole() -> Iterator[None]:
    """Walks inside take every batch on every process (stages not split: the MoE
    router statistics and NAEE's search read all the windows at once)."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def running(at: tuple[int, int] | None) -> Iterator[None]:
    """Hooks inside see `at`: the global index of the batch being run and the batch count."""
    token = _RUNNING.set(at)
    try:
        yield
    finally:
        _RUNNING.reset(token)


def running_batch() -> tuple[Shard, int, int] | None:
    """(shard, global batch index, batches) of the split batch a walk is running now."""
    at, shard = _RUNNING.get(), _CURRENT.get()
    return None if at is None or shard is None else (shard, *at)


def replay(local: Sequence[T], apply: Callable[[T], None]) -> None:
    """`apply` every batch's item in global batch order: this process's `local` ones
    alone with one process, every process's (`Shard.gathered`) when split. A collective:
    every process calls it, with its own items (maybe none)."""
    shard = current()
    for item in shard.gathered(local) if shard is not None else local:
        apply(item)


def plain_add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part


class Ring:
    """Sums over the split batches of several tensors, each added in global batch order
    (see the module docstring): `add` once per batch of this process, in its order, then
    `result` on every process. A tensor absent in a batch (None) is not added."""

    def __init__(
        self, shard: Shard, likes: Sequence[torch.Tensor] | None = None, add: Add = plain_add
    ):
        self.shard = shard
        self.likes = list(likes) if likes is not None else None  # each sum's shape, dtype
        self.totals: list[torch.Tensor | None] = [None] * len(self.likes or ())
        self.combine = add
        self._seen = 0

    def add(self, b: int, n: int, parts: Sequence[torch.Tensor | None]) -> None:
        """Batch b of n (this process's): the sums of batches < b from the process of
        b - 1, these parts added, the sums passed to the process of b + 1."""
        here = self.shard.rank
        if self.likes is None:  # the first batch here says what the sums look like
            self.likes = [p for p in parts if p is not None]
            if len(self.likes) != len(parts):
                raise ValueError("a ring without `likes` needs every part of its first batch")
            self.totals = [None] * len(parts)
        if b > 0 and self.shard.holder(b - 1) != here:
            self.totals = self._recv(self.shard.holder(b - 1))
        self.totals = [
            t if p is None else self.combine(t, p) for t, p in zip(self.totals, parts, strict=True)
        ]
        self._seen += 1
        if b + 1 < n and self.shard.holder(b + 1) != here:
            self._send(self.shard.holder(b + 1))

    def result(self) -> list[torch.Tensor | None]:
        """The sums over every batch, on every process (a collective; a process that
        walked no batch learns their shapes from the process of the last one)."""
        n = self.shard.total(self._seen)
        if n == 0:
            return self.totals
        src = self.shard.holder(n - 1)
        here = self.shard.rank == src
        box: list[Any] = [
            [None if t is None else (tuple(t.shape), t.dtype) for t in self.totals]
            if here
            else None
        ]
        torch.distributed.broadcast_object_list(box, src, device=self.shard.device)
        out: list[torch.Tensor | None] = []
        for j, meta in enumerate(box[0]):
            if meta is None:
                out.append(None)
                continue
            shape, dtype = meta
            tensor = self.totals[j] if here else None
            if tensor is None:
                device = self.likes[j].device if self.likes else self.shard.device
                tensor = torch.empty(shape, dtype=dtype, device=device)
            torch.distributed.broadcast(tensor, src)
            out.append(tensor)
        self.totals = out
        return out

    def _flag(self, t: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor([int(t is not None)], dtype=torch.long, device=self.shard.device)

    def _send(self, dst: int) -> None:
        for t in self.totals:
            torch.distributed.send(self._flag(t), dst)
            if t is not None:
                torch.distributed.send(t.contiguous(), dst)

    def _recv(self, src: int) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for like in self.likes:
            flag = self._flag(None)
            torch.distributed.recv(flag, src)
            if int(flag.item()):
                t = torch.empty_like(like)
                torch.distributed.recv(t, src)
                out.append(t)
            else:
                out.append(None)
        return out


# ---- the process group -----------------------------------------------------------------


def launched() -> bool:
    """Whether torchrun (or `python -m torch.distributed.run`) started this process as
    one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> tuple[Shard, str]:
    """Join torchrun's processes (gloo on the CPU, nccl on CUDA) and make this process's
    shard the current one; returns it and this process's device (`cuda` and `cuda:N`
    become `cuda:LOCAL_RANK`: one GPU per process)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    shard = Shard(rank, world, torch.device(device if device.startswith("cuda") else "cpu"))
    _CURRENT.set(shard)
    return shard, device


def stop() -> None:
    """Leave the process group; this process walks every batch again."""
    import torch.distributed as dist

    _CURRENT.set(None)
    if dist.is_initialized():
        dist.destroy_process_group()
