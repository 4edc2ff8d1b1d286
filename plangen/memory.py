"""Where `plangen analyze` runs the model: whole in memory, or one decoder layer at a time.

Both run the same code: the executor's layer walk (`executor.layerwise.LayerWalk`),
over the loaded model with every layer resident, or opened on the checkpoint so
that each decoder layer is read when the walk reaches it and freed after. The
choice is `--offload [DIR]`; without it the model is analyzed in memory when the
estimate below says it fits, and layer by layer otherwise (said on stderr).

The estimates, in bytes of the compute dtype (`width`):

  in memory    parameters x width, and with gradients 2.5 x that (their `.grad`
               while one layer is swept, activations)
  layer-wise   256 MiB + largest layer (x 3 with gradients: its weights, its
               gradients, its recomputed activations) + its largest weight in
               float64 (the metrics' working copy) + max(embedding, head)
               + the state cache: calibration tokens x hidden x width per layer
               boundary, kept at every boundary (layers + 1) for the reverse
               sweep, two boundaries without gradients; under --offload DIR on
               disk, not in memory

`benchmarks/layerwise_memory.py` measures the layer-wise peak against this
formula (`benchmarks/results/layerwise-memory.md`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.checkpoint import CheckpointFacts

if TYPE_CHECKING:  # torch and the executor are imported when a walk is opened
    import torch

    from executor.layerwise import LayerWalk

MEMINFO = Path("/proc/meminfo")
MEMORY_CHECK_ENV = "PLANCC_NO_MEMORY_CHECK"  # set to 1: the same as --no-memory-check
# What the run allocates besides the model once placed: the tokenizer, the skeleton's
# buffers, the tables (python and torch are in use already: not in what is free).
RUNTIME_BASE = 256 << 20


class DoesNotFit(Exception):
    """Not even the layer-wise walk fits; the message says what to change."""


@dataclass(frozen=True)
class Placement:
    """How the analysis runs the model: `layerwise` (one decoder layer at a time) with
    the states between layers `states` ("host": in memory, or a directory on disk);
    `said`: the line that tells the user when it was chosen for them."""

    layerwise: bool
    states: str | Path = "host"
    said: str | None = None
    sharded: bool = False  # under torchrun: the sweep's layers sharded (executor.sharding)


IN_MEMORY = Placement(False)


def available_memory() -> int | None:
    """Bytes the kernel could give a new process without swapping: MemAvailable,
    which counts reclaimable page cache (MemFree does not, and on a machine that has
    read a few checkpoints it is a small fraction of what is usable). None: unknown."""
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit.strip() == "kB" else 1)
    except (OSError, ValueError):
        pass
    return None


STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int | None:
    try:
        for line in STATUS.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024  # always kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_headroom() -> int | None:
    """Bytes this process may still allocate under its own limits: RLIMIT_DATA (heap
    and private maps; `VmData` used) and RLIMIT_AS (every map; `VmSize` used). None:
    no limit set. A container's or a batch system's limit is often one of these."""
    import resource

    room = None
    for limit, used_key in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft, _hard = resource.getrlimit(limit)
        used = _status_bytes(used_key)
        if soft == resource.RLIM_INFINITY or used is None:
            continue
        room = max(0, soft - used) if room is None else min(room, max(0, soft - used))
    return room


def free_memory(device: str) -> tuple[int | None, str]:
    """Bytes free where the model would live, and the words for it."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free, "GPU memory free"
    available, headroom = available_memory(), process_headroom()
    if headroom is not None and (available is None or headroom < available):
        return headroom, "memory left under this process's limit (ulimit -d / -v)"
    return available, "memory available (MemAvailable)"


def checks_disabled(memory_check: bool) -> bool:
    return not memory_check or os.environ.get(MEMORY_CHECK_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Footprint:
    """The sizes the estimates are made of, in parameters (tensor elements)."""

    params: int  # every tensor of the checkpoint
    largest_layer: int  # the largest decoder layer
    outside: int  # the larger of the embedding and the LM head (with the final norm)
    hidden: int
    layers: int
    largest_tensor: int = 0  # the largest tensor in a layer (metrics copy it in float64)

    @classmethod
    def of(cls, ckpt: CheckpointFacts) -> Footprint:
        head, _, tail = ckpt.arch.layer_prefix.partition("{i}")
        in_layer = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        per_layer: dict[str, int] = {}
        outside: list[int] = []
        largest = 0
        for name, info in ckpt.index.items():
            n = math.prod(info.shape)
            found = in_layer.match(name)
            if found:
                per_layer[found[1]] = per_layer.get(found[1], 0) + n
                largest = max(largest, n)
            else:
                outside.append(n)
        facts = ckpt.facts
        return cls(
            params=sum(per_layer.values()) + sum(outside),
            largest_layer=max(per_layer.values(), default=0),
            outside=max(outside, default=0),
            hidden=int(facts.get("hidden") or 0),
            layers=len(per_layer),
            largest_tensor=largest,
        )

    def in_memory(self, width: int, gradients: bool) -> int:
        return int(self.params * width * (2.5 if gradients else 1.0))

    def state_cache(self, width: int, tokens: int, gradients: bool) -> int:
        boundaries = self.layers + 1 if gradients else 2
        return tokens * self.hidden * width * boundaries

    def layerwise(
        self, width: int, tokens: int, gradients: bool, on_disk: bool, world: int = 1
    ) -> int:
        """One layer (with gradients: its weights, gradient sums and one batch's
        gradients; sharded across `world` processes, beside the shards about four
        copies of the largest unit: gathered, its gradient, the gradient's copy FSDP
        reduces, the next unit prefetched; benchmarks/sharded_sweep.py), the states,
        the accumulators, the embedding."""
        layer = self.largest_layer * width * (3 if gradients else 1)
        if gradients and world > 1:
            layer = layer // world + self.largest_tensor * width * 4
        scoring = self.largest_tensor * 8  # a metric's float64 copy of one weight
        states = 0 if on_disk else self.state_cache(width, tokens, gradients)
        return RUNTIME_BASE + layer + scoring + self.outside * width + states


def room_beside(
    extra: int, footprint: Footprint, width: int, tokens: int, gradients: bool, on_disk: bool
) -> bool:
    """Whether `extra` bytes more of host memory fit beside what the calibration still
    allocates once the model is placed (its state cache, unless on disk, and the
    runtime's share), by what is free now. Unknown (not Linux): yes."""
    free, _ = free_memory("cpu")
    if free is None:
        return True
    states = 0 if on_disk else footprint.state_cache(width, tokens, gradients)
    return extra + states + RUNTIME_BASE <= free


def in_step_fits(walk: LayerWalk, hidden: int, ffn: int, tokens: int) -> bool:
    """Whether the sequential reconstruction may run a decoder layer's batches in step
    (`LayerWalk.lockstep`: one layer-forward instead of about two), which holds every
    batch's live tensors at down_proj's input at once: per token the layer's input,
    residual and normed states and the outputs of the batches done (about 6 x hidden)
    and the MLP's product and its input (2 x ffn), in the compute dtype, on the walk's
    device. Never when the states are on disk: they are there because memory is short."""
    if walk.cache not in ("host", "device"):
        return False
    free, _ = free_memory(str(walk.device))
    if free is None:
        return True
    width = walk.model.dtype.itemsize
    return tokens * (6 * hidden + 2 * ffn) * width + RUNTIME_BASE <= free


def fused_fits(walk: LayerWalk, batch_tokens: int, seqlen: int, reserve: int = 0) -> bool:
    """Whether the calibration's gradient pass may run batch by batch through every
    layer (`LayerWalk.fused_sweep`, no layer recomputed), which holds at once one
    batch's activations of every layer, per token and layer about 10 x hidden + 6 x
    ffn values of the compute dtype and a float32 attention row per head (65 KB a
    token and layer measured on SmolLM2: 10/6 round that up), and every layer's
    gradients, beside `reserve` bytes the pass will also fill (the Grams an observer
    gathers). Only a resident walk (the model in memory) on one process."""
    config = walk.config
    sizes = [getattr(config, key, None) for key in ("hidden_size", "intermediate_size")]
    heads = getattr(config, "num_attention_heads", None)
    if not walk.resident or None in sizes or heads is None:
        return False
    free, _ = free_memory(str(walk.device))
    if free is None:
        return True
    width = walk.model.dtype.itemsize
    hidden, ffn = int(sizes[0]), int(sizes[1])
    per_token = (10 * hidden + 6 * ffn) * width + 4 * int(heads) * seqlen
    activations = batch_tokens * walk.num_layers * per_token
    grads = sum(p.numel() for p in walk.layers.parameters()) * width
    return activations + grads + reserve + RUNTIME_BASE <= free


def size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def placement(
    offload: str | None,
    memory_check: bool,
    device: str,
    dtype: str,
    footprint: Footprint,
    tokens: int,
    gradients: bool,
    doing: str = "analyzing",
    fewer: str | None = "fewer --nsamples",
    shard: bool = False,
    world: int = 1,
) -> Placement:
    """In memory or layer by layer: `--offload` decides when given ("" : states in
    memory, else the directory for them); otherwise in memory when the model fits
    the device, layer by layer when only that fits, and an error (DoesNotFit) that
    names the way out when neither does. --no-memory-check: in memory, unchecked.
    `doing` and `fewer` word the line and the advice for the command asking (`plangen
    reconstruct` re-solves, and its token count is the plan's, not an option).

    Under torchrun (`world` processes), `shard` (--shard-layers) shards the gradient
    pass's layers across the processes, layer by layer; it is also chosen, and said,
    when a layer's backward fits only sharded."""
    width = 2 if dtype == "bfloat16" else 4
    states_at = Path(offload) if offload else "host"
    if shard:
        return Placement(True, states_at, sharded=True)
    if offload is not None:
        return Placement(True, states_at)
    if checks_disabled(memory_check):
        return IN_MEMORY
    free, where = free_memory(device)
    whole = footprint.in_memory(width, gradients)
    if free is None or whole <= free:  # not Linux: no estimate worth acting on
        return IN_MEMORY
    walk = footprint.layerwise(width, tokens, gradients, on_disk=False)
    what = "weights, gradients and activations" if gradients else "weights"
    need = f"the model needs about {size(whole)} on {device} ({what}, {dtype})"
    if walk <= free:
        return Placement(
            True,
            "host",
            f"plangen: {need} but only {size(free)} {where}: {doing} it one decoder "
            f"layer at a time (--offload; about {size(walk)})",
        )
    sharded = footprint.layerwise(width, tokens, gradients, on_disk=False, world=world)
    if gradients and world > 1 and sharded <= free:
        return Placement(
            True,
            "host",
            f"plangen: {need} but only {size(free)} {where}, and about {size(walk)} even "
            f"one decoder layer at a time: {doing} it one layer at a time, each sharded "
            f"across the {world} processes for the gradient pass (--shard-layers; about "
            f"{size(sharded)})",
            sharded=True,
        )
    on_disk = footprint.layerwise(width, tokens, gradients, on_disk=True)
    advice = (
        f"--offload DIR (the {size(footprint.state_cache(width, tokens, gradients))} of "
        "states between layers on disk under DIR), "
        if on_disk <= free
        else ""
    )
    advice += "--dtype bfloat16, " if dtype == "float32" else ""
    advice += f"{fewer}, " if fewer and not advice.startswith("--offload") else ""
    raise DoesNotFit(
        f"{need} but only {size(free)} {where}, and about {size(walk)} even one decoder "
        f"layer at a time; use {advice}a larger device, or, if the estimate is wrong, "
        f"--no-memory-check (or {MEMORY_CHECK_ENV}=1)"
    )


def prepared(placed: Placement, tell: bool = True) -> Placement:
    """A placement made ready before any window is read: its line said on stderr when
    it was chosen for the user (`tell`: this process speaks), and the leftovers of a
    killed run removed from its state directory."""
    import sys

    if placed.said is not None and tell:
        print(placed.said, file=sys.stderr)
    if isinstance(placed.states, Path):
        from plangen import staging

        staging.remove_stale_caches(placed.states)
    return placed


def open_walk(
    ckpt: CheckpointFacts, placed: Placement, device: str, dtype: str, batch_size: int
) -> tuple[LayerWalk, torch.nn.Module | None]:
    """The walk a placement runs the model through, and the model when it is loaded
    whole: opened on the checkpoint (each layer read when reached, then freed), or
    over the loaded model (every layer resident)."""
    import torch

    from executor.layerwise import LayerWalk
    from executor.loader import load

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if placed.layerwise:
        walk = LayerWalk.open(
            ckpt.model_dir,
            device,
            torch_dtype,
            batch_size=batch_size,
            cache=placed.states,
            shard_layers=placed.sharded,
        )
        return walk, None
    model = load(ckpt.model_dir, device, torch_dtype)
    return LayerWalk.over(model, ckpt.arch, device, batch_size), model
