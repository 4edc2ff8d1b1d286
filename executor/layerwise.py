"""Run a causal LM one decoder layer at a time: the walk engine of issue 36.

A model that does not fit in memory is never loaded whole. `LayerWalk.open`
reads config.json and builds the model's skeleton with every parameter on the
meta device (no weights read, nothing allocated; the small buffers computed at
construction, such as rotary tables and Gemma's embedding scale, are real).
Then, as SparseGPT, Wanda and llm-compressor's sequential pipeline do:

    walk = LayerWalk.open(model_dir)            # or resident=True: all loaded once
    states = walk.inputs(windows)               # embeddings + each layer's call args
    for i in range(walk.num_layers):
        with walk.layer(i) as module:           # layer i read from the safetensors
            states = walk.forward_layer(i, states, module)
    loss = walk.loss(states)                    # final norm + LM head, freed after

- `inputs` embeds the windows, `batch_size` at a time, and records what the
  model passes every decoder layer (position ids, rotary cos/sin, the causal or
  sliding-window mask of that layer, ...) by running the model's own forward
  with each decoder layer replaced by a recorder that returns its input, and
  stopping before the final norm: no decoder layer runs, and each layer gets
  exactly the arguments the full forward would give it (Gemma-3's sliding and
  global layers get different masks and rotary tables).
- `layer(i)` reads only layer i's tensors (views of the files mapped shared and
  read-only, so the page cache holds them, not the process), converts them
  to the compute dtype on the device, fuses per-expert MoE tensors as
  `from_pretrained` does, and on exit puts every parameter back on meta. The
  layer's non-persistent buffers were built with the skeleton and stay. In
  resident mode it yields the loaded layer and frees nothing: the in-memory
  path is the same walk with every layer resident.
- States live in a `StateCache`: on the host (default), on the device, or on
  disk under a directory (`cache=Path`, one safetensors file per batch in a
  temporary directory removed by `close`).
- `loss` is `plangen.heldout.mean_loss`'s figure, computed by the same code
  (`executor.lm_loss`: the head over slices of tokens, log-sum-exp in float32
  summed in float64, one float32 mean per batch weighted by its predicted
  tokens; the model's own loss function where the head is not a plain linear
  map), so it is bit-identical to the full model's. `losses` gives it for the
  final states of several variants of the model walked through the same loaded
  layers (`plangen.heldout.walk_losses`), the head loaded once for all.
- `backward_sweep(windows, on_layer, on_batch=..., wants=...)` gives the
  gradients of that loss exactly as a full model's per-batch backward does
  (calibration's batching and normalisation): `boundaries` walks forward
  keeping the states at every layer boundary (L + 1 caches: host, device or
  disk), the head computes each batch's loss and its gradient with respect to
  the final states, then from the last layer down each layer is loaded,
  recomputed from its stored input with autograd on and back-propagated with
  the gradient from above; `on_batch(i, k, module, grads)` sees batch k's
  gradients (in autograd's order), `on_layer(i, module)` the parameters'
  `.grad` summed over batches; the input's gradient goes down, the layer and
  its boundary are freed. Bit-identical to the full model's sums
  (tests/executor/test_layerwise_gradients.py); one extra forward of each layer.
  Opened with `shard_layers` under torchrun, the sweep splits each layer across
  the processes (`executor.sharding`, FSDP2; every process runs every batch):
  the same sums, bit for bit (tests/executor/test_sharded_sweep.py).

The embedding is loaded by `inputs` and freed after; the final norm and LM
head by `loss`/`logits` and freed after (tied heads read the embedding's
tensor). Peak memory is then about one decoder layer in the compute dtype +
the state cache + the larger of the embedding and the head + the runtime.

Only stock checkpoints are walked (a `plancc apply` result with per-layer
widths, config key `plancc`, is loaded whole by `executor.loader.load`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import mmap
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compiler.architectures import Architecture
from compiler.checkpoint import TensorInfo, architecture_of, read_config, tensor_index
from executor import distributed, lm_loss, sharding
from executor.family_config import PLANCC_KEY
from executor.loader import fuse_experts
from executor.lockstep import Crew, Stop, in_step

# Attributes with which a config changes the logits after the head's matmul. Gemma-2's
# soft-capping is applied here; the others are refused rather than silently ignored.
_SOFTCAP = "final_logit_softcapping"
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling")


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _Recorded(Exception):
    """Raised at the final norm once every layer's call arguments are recorded."""


class StopLayer(Exception):
    """Raised by a hook inside a layer to end its run on one batch early (`observe`,
    `forward_batch`): what the layer computes after that point is not needed."""


# --------------------------------------------------------------------------- skeleton


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and buffers real.

    `torch.device("meta")` would also put the buffers computed in `__init__`
    (rotary inverse frequencies, embedding scales) on meta, losing their values.
    Here only `register_parameter` is redirected (accelerate's
    `init_empty_weights(include_buffers=False)`, in plain torch): a parameter is
    created by `torch.empty` (untouched memory, never committed) and moved to meta
    at once; initialisers then run on meta, i.e. not at all.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD = 4 << 20


@functools.cache
def _steady_heap() -> bool:
    """Fix glibc's mmap threshold at 4 MiB (once per process; False where not glibc).

    glibc raises its threshold to the size of every mmap-served block freed (up to
    32 MiB), so after the first layer is freed, the next layer's mid-sized tensors
    (Llama-3-8B's k/v projections: 16 MiB in fp32) come from the heap, which
    fragments: peak anonymous memory then drifted by several layers' worth from run
    to run (0.36-1.46 GB for the same walk). A fixed threshold serves every block of
    4 MiB or more by mmap, returned to the system when freed: the peak is steady.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where not glibc
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _release_heap() -> None:
    """Give the freed heap back to the system (glibc's `malloc_trim`; nothing where not
    glibc). After the fused sweep freed one batch's activations of every layer
    (gigabytes, allocated and freed batch after batch), the walks that followed ran
    20% slower on a heap left that large (SmolLM2: the reconstruction 62 s instead of
    53 s); trimmed, they do not."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# --------------------------------------------------------------------------- states


CACHE_PREFIX = "plancc-walk-"  # a state cache's directory: CACHE_PREFIX + PID + "-" + random


class StateCache:
    """The hidden states of every batch at one layer boundary, by batch index.

    In memory on `device` (the host or the accelerator), or, with `directory`,
    one safetensors file per batch in a fresh temporary directory under it
    (`CACHE_PREFIX`, this process's id, a random part), removed by `close` (or
    when the cache is garbage collected). A process killed with SIGKILL removes
    nothing; the next run removes the directories of processes that are gone
    (`plangen.staging.remove_stale_caches`).
    """

    def __init__(self, device: str | torch.device = "cpu", directory: str | Path | None = None):
        self.device = torch.device(device)
        self._items: dict[int, torch.Tensor] = {}
        self._dir: Path | None = None
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            prefix = f"{CACHE_PREFIX}{os.getpid()}-"  # the pid: a killed run's is removable
            self._dir = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._count = 0

    @property
    def directory(self) -> Path | None:
        return self._dir

    def put(self, k: int, state: torch.Tensor) -> None:
        if self._dir is None:
            self._items[k] = state.to(self.device)
        else:
            from safetensors.torch import save_file

            save_file({"state": state.detach().contiguous().cpu()}, str(self._dir / f"{k}.st"))
        self._count = max(self._count, k + 1)

    def get(self, k: int, device: str | torch.device | None = None) -> torch.Tensor:
        target = torch.device(device) if device is not None else self.device
        if self._dir is None:
            return self._items[k].to(target)
        from safetensors.torch import load_file

        return load_file(str(self._dir / f"{k}.st"), device=str(target))["state"]

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            self._cleanup()


@dataclass
class Batch:
    """One batch of windows and what the model gives each decoder layer besides the states."""

    ids: torch.Tensor  # [B, T] token ids, on the host
    args: list[tuple[Any, ...]]  # per layer: positional arguments after the hidden states
    kwargs: list[dict[str, Any]]  # per layer: keyword arguments (masks, rotary cos/sin, ...)
    # Under torchrun: (its global index, the number of batches all processes walk);
    # None when one process walks every batch (`executor.distributed`).
    at: tuple[int, int] | None = None


@dataclass
class States:
    """The hidden states of the walked windows at one layer boundary (`layer` layers run)."""

    batches: list[Batch]
    cache: StateCache
    layer: int = 0

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, k: int, device: str | torch.device | None = None) -> torch.Tensor:
        return self.cache.get(k, device)


# --------------------------------------------------------------------------- the walk


class LayerWalk:
    """A causal LM run one decoder layer at a time (see the module docstring)."""

    def __init__(
        self,
        model_dir: Path,
        model: nn.Module,
        arch: Architecture,
        index: dict[str, TensorInfo],
        device: torch.device,
        batch_size: int,
        cache: str | Path,
        resident: bool,
        shard_layers: bool = False,
    ):
        if shard_layers and resident:
            raise ValueError("sharding a layer for the sweep needs the layer-wise walk")
        self.model_dir = model_dir
        self.model = model
        self.arch = arch
        self.index = index
        self.device = device
        self.batch_size = batch_size
        self.cache = cache
        self.resident = resident
        self.shard_layers = shard_layers  # the sweep's layers sharded under torchrun
        self.layers: nn.ModuleList = model.get_submodule(arch.layers_module)
        self._handles: dict[str, mmap.mmap] = {}
        self._head_modules = _head_modules(model)
        self._tied = _tied_names(model)
        self._loaded_outside: set[str] = set()
        self._caches: list[weakref.ref[StateCache]] = []

    # ---- construction

    @classmethod
    def open(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resident: bool = False,
        batch_size: int = 4,
        cache: str | Path = "host",
        attn_implementation: str | None = None,
        shard_layers: bool = False,
    ) -> LayerWalk:
        """Read config.json and the safetensors headers and build the skeleton on meta.

        `cache`: where states live between layers: "host" (default), "device", or a
        directory (states on disk under it). `resident=True` loads every weight now
        (the in-memory mode) and `layer` then frees nothing. `shard_layers`: under
        torchrun, the reverse sweep shards each layer across the processes
        (`executor.sharding`; every process then sweeps every batch).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if not resident:
            _steady_heap()
        model_dir = Path(model_dir)
        raw = read_config(model_dir)
        if raw.get(PLANCC_KEY):
            raise ValueError(
                f"{model_dir}: a `plancc apply` result with per-layer widths; "
                "the layer-wise walk reads stock checkpoints only (use executor.loader.load)"
            )
        arch = architecture_of(raw, str(model_dir / "config.json"))
        config = AutoConfig.from_pretrained(model_dir)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            if getattr(config, name, None) not in (None, 1, 1.0):
                raise ValueError(f"{model_dir}: config `{name}` is not supported by the walk")
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        device = torch.device(device)
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        walk = cls(
            model_dir,
            model,
            arch,
            tensor_index(model_dir),
            device,
            batch_size,
            cache,
            resident,
            shard_layers,
        )
        if resident:
            walk._load_outside(walk._outside_names())
            for i in range(walk.num_layers):
                walk._load_layer(i)
        return walk

    @classmethod
    def over(
        cls,
        model: nn.Module,
        arch: Architecture,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        cache: str | Path = "device",
    ) -> LayerWalk:
        """The walk over a model already loaded whole (`executor.loader.load`): resident,
        nothing read or freed; states where `cache` says (default: beside the model)."""
        walk = cls(Path(), model, arch, {}, torch.device(device), batch_size, cache, True)
        walk._loaded_outside.update(walk._outside_names())
        return walk

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self) -> Any:
        return self.model.config

    def __enter__(self) -> LayerWalk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the file mappings (unmapped once no view is left) and remove every state
        cache's directory."""
        self._handles.clear()
        for ref in self._caches:
            c = ref()
            if c is not None:
                c.close()
        self._caches.clear()

    def new_cache(self) -> StateCache:
        """An empty state cache where `cache` (given to `open`) says."""
        if self.cache == "host":
            c = StateCache("cpu")
        elif self.cache == "device":
            c = StateCache(self.device)
        else:
            c = StateCache("cpu", directory=self.cache)
        self._caches.append(weakref.ref(c))
        return c

    # ---- reading tensors

    def _file(self, file: str) -> mmap.mmap:
        if file not in self._handles:
            with open(self.model_dir / file, "rb") as fh:
                self._handles[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._handles[file]

    def _read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by name: read-only views of the memory-mapped files (the
        caller copies them, converted, onto the device), in file order."""
        return {n: self._view(self.index[n]) for n in sorted(names, key=self._order)}

    def _view(self, info: TensorInfo) -> torch.Tensor:
        """A tensor over its bytes in a shared read-only mapping of its file.

        Not `safe_open`: its `get_tensor` maps the whole file private and writable,
        which counts as data memory (`RLIMIT_DATA`, strict overcommit accounting)
        as large as the file, though no page is copied. A shared read-only mapping
        is page cache only; the one copy is the conversion into the layer."""
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}")
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        begin, _ = info.byte_range
        with warnings.catch_warnings():  # "not writable": the view is only ever copied
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._file(info.file), dtype=dtype, count=info.numel, offset=begin
            )
        return flat.view(info.shape)

    def _order(self, name: str) -> tuple[str, int]:
        info = self.index[name]
        return info.file, info.data_offsets[0]

    def _set(
        self, root: nn.Module, rel: str, value: torch.Tensor, device: torch.device | None = None
    ) -> None:
        """Put `value` (converted to the placeholder's dtype, on the device or `device`)
        at `rel`."""
        device = device if device is not None else self.device
        owner, _, leaf = rel.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if leaf in module._parameters:
            old = module._parameters[leaf]
            assert old is not None
            dtype = old.dtype if value.is_floating_point() else value.dtype
            t = value.to(device=device, dtype=dtype, copy=True)
            if t.shape != old.shape:
                raise ValueError(f"{rel}: checkpoint {list(t.shape)}, model {list(old.shape)}")
            module._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            old_b = module._buffers[leaf]
            assert old_b is not None
            t = value.to(device=device, dtype=old_b.dtype, copy=True)
            module._buffers[leaf] = t

    def _unset(self, root: nn.Module, rel: str) -> None:
        owner, _, leaf = rel.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if leaf in module._parameters:
            old = module._parameters[leaf]
            assert old is not None
            module._parameters[leaf] = nn.Parameter(_meta_like(old), old.requires_grad)
        else:
            old_b = module._buffers[leaf]
            assert old_b is not None
            module._buffers[leaf] = _meta_like(old_b)

    # ---- decoder layers

    def _layer_slots(self, i: int) -> list[str]:
        """Names (relative to layer i) of its parameters and persistent buffers."""
        layer = self.layers[i]
        return list(layer.state_dict(keep_vars=True))

    def _layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors by layer-relative slot, in slot order: views of the mapped
        files (MoE experts fused as `from_pretrained` fuses them), nothing converted."""
        disk_prefix = self.arch.layer_prefix.replace("{i}", str(i))
        own_prefix = f"{self.arch.layers_module}.{i}."
        slots = self._layer_slots(i)
        state = self._read([n for n in self.index if n.startswith(disk_prefix)])
        own = {own_prefix + s: None for s in slots}
        if self.arch.moe:
            fuse_experts(self.arch, state, own, [i])
        missing = [s for s in slots if own_prefix + s not in state]
        if missing:
            raise ValueError(f"{self.model_dir}: layer {i} lacks {missing[:5]} in the checkpoint")
        return {s: state.pop(own_prefix + s) for s in slots}

    def _load_layer(self, i: int) -> nn.Module:
        layer = self.layers[i]
        state = self._layer_state(i)
        for s in list(state):
            self._set(layer, s, state.pop(s))
        return layer

    def _free_layer(self, i: int) -> None:
        layer = self.layers[i]
        for s in self._layer_slots(i):
            self._unset(layer, s)

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i materialized on the device; back on meta after (unless resident)."""
        if self.resident:
            yield self.layers[i]
            return
        try:
            yield self._load_layer(i)
        finally:
            self._free_layer(i)

    @contextlib.contextmanager
    def _swept_layer(
        self, i: int, sharded: bool, wants: Callable[[int, str], bool] | None
    ) -> Iterator[tuple[nn.Module, list[nn.Module] | None]]:
        """Layer i for the reverse sweep: loaded whole (units None), or sharded across
        the processes (`executor.sharding`): a copy of its skeleton (on meta: nothing
        allocated) loaded one unit at a time on the host and sharded at once (FSDP
        moves each unit's shard to the device), so no more than one unit is ever
        whole; dropped after, the skeleton untouched, so later walks load layer i as
        before. Yields the layer and its units."""
        if not sharded:
            with self.layer(i) as module:
                yield module, None
            return
        skeleton = self.layers[i]
        layer = self.layers[i] = copy.deepcopy(skeleton)
        try:
            state = self._layer_state(i)

            def load(slots: Sequence[str], device: torch.device) -> None:
                for s in slots:
                    self._set(layer, s, state.pop(s), device)

            wanted = functools.partial(_wanted, wants, i)
            yield layer, sharding.shard_layer(layer, wanted, self.device, load)
        finally:
            self.layers[i] = skeleton

    # ---- embedding, final norm, head

    def _outside_names(self, head: bool | None = None) -> list[str]:
        """Model-level parameter/buffer names outside the decoder layers: the head group
        (final norm, LM head) with head=True, the rest (embedding) with False, all with None."""
        layers_prefix = self.arch.layers_module + "."
        out = []
        for name in self.model.state_dict(keep_vars=True):
            if name.startswith(layers_prefix):
                continue
            in_head = any(name.startswith(p + ".") for p in self._head_modules)
            if head is None or in_head == head:
                out.append(name)
        return out

    def _load_outside(self, names: Sequence[str]) -> None:
        todo = [n for n in names if n not in self._loaded_outside]
        source = {n: n if n in self.index else self._tied.get(n, n) for n in todo}
        absent = [n for n, s in source.items() if s not in self.index]
        if absent:
            raise ValueError(f"{self.model_dir}: the checkpoint lacks {absent[:5]}")
        state = self._read(sorted(set(source.values())))
        for n in todo:
            self._set(self.model, n, state[source[n]])
            self._loaded_outside.add(n)

    def _free_outside(self, names: Sequence[str]) -> None:
        if self.resident:
            return
        for n in names:
            if n in self._loaded_outside:
                self._unset(self.model, n)
                self._loaded_outside.discard(n)

    @contextlib.contextmanager
    def _outside(self, head: bool) -> Iterator[None]:
        names = self._outside_names(head)
        self._load_outside(names)
        try:
            yield
        finally:
            self._free_outside(names)

    # ---- inputs

    def _ids_batches(self, windows: Sequence[Sequence[int]] | torch.Tensor) -> list[torch.Tensor]:
        ids = torch.as_tensor(windows) if isinstance(windows, torch.Tensor) else None
        if ids is None:
            ids = torch.tensor([list(w) for w in windows], dtype=torch.long)
        return [ids[s : s + self.batch_size].clone() for s in range(0, len(ids), self.batch_size)]

    def inputs(self, windows: Sequence[Sequence[int]] | torch.Tensor) -> States:
        """The embeddings of the windows (`batch_size` per batch) and every layer's call
        arguments, recorded from the model's own forward without running any decoder layer.

        Under torchrun (`executor.distributed.current()`), only this process's share of
        the batches (`Shard.mine`: the one place the split is decided), each knowing its
        global index; every later step of the walk runs on that share."""
        cache = self.new_cache()
        batches = []
        every = self._ids_batches(windows)
        shard = distributed.current()
        mine = shard.mine(len(every)) if shard is not None else range(len(every))
        with self._outside(head=False), torch.no_grad():
            for k, b in enumerate(mine):
                ids = every[b]
                hidden, args, kwargs = self._record(ids.to(self.device))
                cache.put(k, hidden)
                at = (b, len(every)) if shard is not None else None
                batches.append(Batch(ids, args, kwargs, at))
        return States(batches, cache, 0)

    def _record(
        self, ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[Any, ...]], list[dict[str, Any]]]:
        n = self.num_layers
        args: list[tuple[Any, ...]] = [()] * n
        kwargs: list[dict[str, Any]] = [{}] * n
        first: list[torch.Tensor] = []

        def recorder(i: int) -> Any:
            def forward(*a: Any, **kw: Any) -> Any:
                hidden = a[0] if a else kw.pop("hidden_states")
                args[i], kwargs[i] = tuple(a[1:]), kw
                if i == 0:
                    first.append(hidden)
                return hidden

            return forward

        def stop(_module: nn.Module, a: tuple[Any, ...]) -> None:
            if not first:
                first.append(a[0])
            raise _Recorded

        norm = self.model.get_submodule(self._head_modules[0]) if self._head_modules else None
        if norm is None or norm is self.model.get_output_embeddings():
            raise ValueError("the walk needs a final norm module before the LM head")
        hook = norm.register_forward_pre_hook(stop)
        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        try:
            self.model.base_model(input_ids=ids, use_cache=False)
        except _Recorded:
            pass
        else:
            raise RuntimeError("the model's forward did not reach its final norm")
        finally:
            hook.remove()
            for layer in self.layers:
                del layer.forward
        return first[0], args, kwargs

    # ---- one layer

    def forward_layer(
        self, i: int, states: States, module: nn.Module | None = None, inplace: bool = False
    ) -> States:
        """Run decoder layer i (the module `layer(i)` yielded) on every batch of `states`.

        Returns the states after it, in a new cache, or in `states`'s own cache with
        `inplace` (each batch's input dropped as soon as its output is computed: half
        the memory, but the boundary is gone; a reverse sweep keeps them)."""
        if states.layer != i:
            raise ValueError(f"these states are the input of layer {states.layer}, not {i}")
        out = states.cache if inplace else self.new_cache()
        for k in range(len(states)):
            out.put(k, self.forward_batch(i, states, k, module))
        return States(states.batches, out, i + 1)

    def skip(self, i: int, states: States) -> States:
        """Layer i left out (a dropped layer passes its input on): the same states as its output."""
        if states.layer != i:
            raise ValueError(f"these states are the input of layer {states.layer}, not {i}")
        return States(states.batches, states.cache, i + 1)

    def forward_batch(
        self, i: int, states: States, k: int, module: nn.Module | None = None
    ) -> torch.Tensor:
        """Decoder layer i on batch k of `states` (its input): the output; `states` unchanged."""
        if states.layer != i:
            raise ValueError(f"these states are the input of layer {states.layer}, not {i}")
        module = module if module is not None else self.layers[i]
        batch = states.batches[k]
        with torch.no_grad(), distributed.running(batch.at):  # hooks see the global batch
            return _layer_output(module, i, states.get(k, self.device), batch)

    def observe(self, i: int, states: States, module: nn.Module | None = None) -> None:
        """Decoder layer i on every batch of `states` for the sake of hooks on its modules
        (outputs dropped); a hook may end a batch's run early by raising `StopLayer`."""
        for k in range(len(states)):
            with contextlib.suppress(StopLayer):
                self.forward_batch(i, states, k, module)

    def lockstep(
        self,
        i: int,
        states: States,
        stops: Sequence[Stop],
        module: nn.Module | None = None,
        inplace: bool = False,
        crew: Crew | None = None,
    ) -> States:
        """`forward_layer` with every batch's run in step (`executor.lockstep`): at each
        stop's module, every batch waits until all have reached it, the stop's `then`
        runs once (a solve that rewrites the module's weight), and every batch goes on.
        One layer-forward per batch instead of a pass to each stop and one through the
        layer, the same arithmetic in the same order; every batch's live tensors at a
        stop exist at once (`plangen.memory.in_step_fits`). `crew`: the threads, kept
        from layer to layer (default: a crew for this layer alone)."""
        if states.layer != i:
            raise ValueError(f"these states are the input of layer {states.layer}, not {i}")
        batch = functools.partial(self.forward_batch, i, states, module=module)
        if crew is None:
            outputs = in_step(len(states), batch, stops)
        else:
            outputs = crew.in_step(len(states), batch, stops)
        out = states.cache if inplace else self.new_cache()
        for k, output in enumerate(outputs):
            out.put(k, output)
        return States(states.batches, out, i + 1)

    def run(self, windows: Sequence[Sequence[int]] | torch.Tensor) -> States:
        """`inputs`, then every layer loaded, run and freed in turn: the final states."""
        states = self.inputs(windows)
        for i in range(self.num_layers):
            with self.layer(i) as module:
                states = self.forward_layer(i, states, module, inplace=True)
        return states

    # ---- head

    def _norm_and_head(self) -> tuple[nn.Module, nn.Module]:
        head = self.model.get_output_embeddings()
        norm = self.model.get_submodule(self._head_modules[0])
        return norm, head

    def logits(self, states: States) -> list[torch.Tensor]:
        """Final norm + LM head of every batch of final states: logits [B, T, V] per batch."""
        self._check_final(states)
        out = []
        with self._outside(head=True), torch.no_grad():
            norm, head = self._norm_and_head()
            for k in range(len(states)):
                out.append(self._soft_cap(head(norm(states.get(k, self.device)))))
        return out

    def _soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, _SOFTCAP, None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def loss(self, states: States) -> float:
        """Mean next-token loss (nats) over the walked windows, as `mean_loss` computes it."""
        return self.losses([states])[0]

    def losses(self, finals: Sequence[States]) -> list[float]:
        """`loss` of each of several final states (of one or more walks over the same
        layers: variants of the model), the final norm and head loaded once for all."""
        for states in finals:
            self._check_final(states)
        with self._outside(head=True), torch.no_grad():
            return [self._mean_head_loss(states) for states in finals]

    def _mean_head_loss(self, states: States) -> float:
        """The mean over batches weighted by predicted tokens, summed in batch order as
        `mean_loss` sums it (head loaded); under torchrun every process's batches, in
        global batch order (a collective)."""
        terms = []
        for k, batch in enumerate(states.batches):
            predicted = batch.ids[:, 1:].numel()
            loss = float(self._head_loss(states.get(k, self.device), batch.ids))
            terms.append((loss * predicted, predicted))
        return _weighted_mean(terms)

    def _head_loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One batch's mean next-token loss from its final states (head loaded), as
        `executor.lm_loss.next_token_loss` computes it on the full model: the sliced
        loss where the head is plain (differentiable in `hidden` through its stored
        gradient when grad mode is on), the model's own loss function otherwise."""
        norm, head = self._norm_and_head()
        ids = ids.to(self.device)
        normed = norm(hidden)
        if not lm_loss.plain_head(head, self.config):
            logits = self._soft_cap(head(normed))
            vocab = logits.shape[-1]
            return self.model.loss_function(logits=logits, labels=ids, vocab_size=vocab)
        shifted = normed[:, :-1].reshape(-1, normed.shape[-1])
        labels = ids[:, 1:].reshape(-1)
        if torch.is_grad_enabled() and shifted.requires_grad:
            return lm_loss.SlicedHeadLoss.apply(shifted, head.weight, labels)
        return lm_loss.sliced(shifted, head.weight, labels, want_grad=False)[0]

    # ---- the reverse sweep

    def boundaries(self, source: Sequence[Sequence[int]] | torch.Tensor | States) -> list[States]:
        """The states at every layer boundary: [the input of layer 0, ..., the output of
        the last layer], each layer loaded, run and freed in turn (L + 1 state caches,
        where `cache` says: host, device or disk). `source`: windows, or `inputs`' states."""
        states = source if isinstance(source, States) else self.inputs(source)
        if states.layer != 0:
            raise ValueError(f"these states are the input of layer {states.layer}, not 0")
        out = [states]
        for i in range(self.num_layers):
            with self.layer(i) as module:
                states = self.forward_layer(i, states, module)
            out.append(states)
        return out

    def backward_sweep(
        self,
        source: Sequence[Sequence[int]] | torch.Tensor | States | Sequence[States],
        on_layer: Callable[[int, nn.Module], None] | None = None,
        *,
        on_batch: Callable[[int, int, nn.Module, dict[str, torch.Tensor]], None] | None = None,
        wants: Callable[[int, str], bool] | None = None,
    ) -> float:
        """Gradients of the mean next-token loss, one decoder layer at a time, exactly as a
        full model's backward gives them; returns the mean loss (`loss`'s figure).

        `source`: windows, `inputs`' states, or `boundaries`' list (consumed: each
        boundary's cache is closed once its layer is done). The head computes each
        batch's loss (`executor.lm_loss`, as calibration does) and its gradient with
        respect to the final states; then, for i from the last layer down, layer i is
        loaded, recomputed from its stored input with autograd on, and back-propagated
        with the incoming gradient, batch by batch; the gradient of its input is kept
        for layer i - 1, and the layer is freed.

        Batching and normalisation are calibration's (`plangen.calibrate.collect`): one
        backward per batch of the batch's mean loss, the batches' gradients summed per
        parameter in batch order. `on_batch(i, k, module, grads)` sees batch k's
        gradient of each of layer i's parameters (layer-relative names; the Fisher
        term needs per-batch gradients); `on_layer(i, module)` is called once every
        batch is done, with each parameter's `.grad` the sum over batches (cleared
        after). `wants(i, name)` picks the parameters that get gradients (default: all
        of the layer's; fewer is cheaper, the others' values are unchanged).
        """
        sharded = self.shard_layers and sharding.active()
        if sharded and distributed.current() is not None:
            raise ValueError(
                "the sharded sweep runs every batch on every process: call it inside "
                "executor.distributed.whole()"
            )
        given = not isinstance(source, States | torch.Tensor) and len(source) > 0
        if given and isinstance(source[0], States):  # type: ignore[index]
            bounds = list(source)  # type: ignore[arg-type]
        else:
            bounds = self.boundaries(source)  # type: ignore[arg-type]
        if [b.layer for b in bounds] != list(range(self.num_layers + 1)):
            raise ValueError("the sweep needs the states at every layer boundary, 0 to L")
        batches = bounds[0].batches
        grads = self.new_cache()
        terms = []
        with self._outside(head=True):
            for k, batch in enumerate(batches):
                final = bounds[-1].get(k, self.device).detach().requires_grad_()
                with torch.enable_grad():
                    loss = self._head_loss(final, batch.ids)
                    (grad,) = torch.autograd.grad(loss, final)
                grads.put(k, grad)
                predicted = batch.ids[:, 1:].numel()
                terms.append((float(loss.detach()) * predicted, predicted))
                del final, loss, grad
        mean = _weighted_mean(terms)
        bounds[-1].cache.close()
        for i in reversed(range(self.num_layers)):
            below = self.new_cache() if i > 0 else None  # layer 0's input needs none
            with self._swept_layer(i, sharded, wants) as (module, units):
                chosen = [
                    (name, p)
                    for name, p in module.named_parameters()
                    if p.requires_grad and _wanted(wants, i, name)
                ]
                if units is not None:
                    self._backward_sharded(
                        i, module, units, chosen, bounds[i], grads, below, on_batch
                    )
                else:
                    self._backward_layer(i, module, chosen, bounds[i], grads, below, on_batch)
                try:
                    if on_layer is not None:
                        on_layer(i, module)
                finally:
                    for _, p in chosen:
                        p.grad = None
            del module, units, chosen
            if sharded:
                gc.collect()  # the sharded layer and FSDP's state refer to each other
            grads.close()
            bounds[i].cache.close()
            if below is not None:
                grads = below
        return mean

    def fused_sweep(
        self,
        states: States,
        on_layer: Callable[[int, nn.Module], None] | None = None,
        *,
        on_forward: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        on_batch: Callable[[int, int, nn.Module, dict[str, torch.Tensor]], None] | None = None,
        wants: Callable[[int, str], bool] | None = None,
    ) -> float:
        """`boundaries` and `backward_sweep` in one, batch by batch, on a resident walk:
        each batch runs forward through every layer with autograd on and its loss back
        through them all, so no layer is recomputed (about one forward pass less); the
        price is one batch's activations of every layer at once
        (`plangen.memory.fused_fits`), and no boundary is kept.

        `states`: `inputs`' states. `on_forward(i, k, h_in, h_out)` sees layer i's states
        on batch k (detached) as the forward passes it, and the hooks on the layers'
        modules fire as in `forward_batch`. The gradients, the `on_batch` calls (per
        batch, from the last layer down, each layer's in autograd's order), the `on_layer`
        calls (once every batch is done, from the last layer down, `.grad` the sums in
        batch order, cleared after) and the mean loss are `backward_sweep`'s, bit for bit
        (tests/executor/test_layerwise_gradients.py). One process only: under torchrun
        the layer-wise sweep sums across processes."""
        if not self.resident:
            raise ValueError("the fused sweep needs every layer resident (resident=True)")
        if distributed.current() is not None:
            raise ValueError("under torchrun the gradients are swept layer by layer")
        if states.layer != 0:
            raise ValueError(f"these states are the input of layer {states.layer}, not 0")
        n = self.num_layers
        chosen = [
            [
                (name, p)
                for name, p in self.layers[i].named_parameters()
                if p.requires_grad and _wanted(wants, i, name)
            ]
            for i in range(n)
        ]
        slots = [(i, j) for i in range(n) for j in range(len(chosen[i]))]
        params = [chosen[i][j][1] for i, j in slots]
        order: list[int] = []  # slots, in the order autograd computes their gradients
        handles = [
            p.register_hook(functools.partial(_note, order, s)) for s, p in enumerate(params)
        ]
        for p in params:
            p.grad = None
        terms = []
        try:
            with self._outside(head=True):
                for k, batch in enumerate(states.batches):
                    order.clear()
                    h = states.get(k, self.device).detach()  # layer 0's input: no gradient
                    with torch.enable_grad():
                        for i, layer in enumerate(self.layers):
                            out = _layer_output(layer, i, h, batch)
                            if on_forward is not None:
                                on_forward(i, k, h.detach(), out.detach())
                            h = out
                        loss = self._head_loss(h, batch.ids)
                        got = torch.autograd.grad(loss, params, allow_unused=True)
                    predicted = batch.ids[:, 1:].numel()
                    terms.append((float(loss.detach()) * predicted, predicted))
                    del h, out, loss
                    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
                    for s in order:
                        i, j = slots[s]
                        name, p = chosen[i][j]
                        per_layer[i][name] = got[s]
                        p.grad = _grad_add(p.grad, got[s])
                    del got
                    if on_batch is not None:
                        for i in reversed(range(n)):
                            on_batch(i, k, self.layers[i], per_layer[i])
                    del per_layer
            mean = _weighted_mean(terms)
            for i in reversed(range(n)):
                try:
                    if on_layer is not None:
                        on_layer(i, self.layers[i])
                finally:
                    for _, p in chosen[i]:
                        p.grad = None
        finally:
            for h_ in handles:
                h_.remove()
            for p in params:
                p.grad = None
            _release_heap()
        return mean

    def _swept_input(self, states: States, k: int, needs_grad: bool) -> torch.Tensor:
        """Batch k's stored layer input on the device, detached (the cache's tensor
        untouched), asking for its gradient when the layer below needs it."""
        hidden = states.get(k, self.device).detach()
        return hidden.requires_grad_() if needs_grad else hidden

    def _backward_layer(
        self,
        i: int,
        module: nn.Module,
        chosen: list[tuple[str, nn.Parameter]],
        states: States,
        grads: StateCache,
        below: StateCache | None,
        on_batch: Callable[[int, int, nn.Module, dict[str, torch.Tensor]], None] | None,
    ) -> None:
        """Layer i's backward, batch by batch: its parameters' `.grad` summed in batch
        order (as autograd accumulates them), its input's gradient put in `below`. Under
        torchrun the sums go round the processes in global batch order
        (`distributed.Ring`), and every process ends with the sums over every batch."""
        params = [p for _, p in chosen]
        shard = distributed.current()
        ring = distributed.Ring(shard, params, _grad_add) if shard is not None else None
        # The order in which autograd computes the parameters' gradients: `on_batch`
        # gets them in that order, the order a full model's parameter hooks see them
        # (calibration folds the Fisher term in it; float sums depend on the order).
        order: list[int] = []
        handles = [
            p.register_hook(functools.partial(_note, order, j)) for j, p in enumerate(params)
        ]
        for p in params:
            p.grad = None
        try:
            for k, batch in enumerate(states.batches):
                hidden = self._swept_input(states, k, below is not None)
                order.clear()
                with torch.enable_grad():
                    out = _layer_output(module, i, hidden, batch)
                    wrt = ([hidden] if below is not None else []) + params
                    upstream = grads.get(k, self.device)
                    got = list(torch.autograd.grad(out, wrt, upstream, allow_unused=True))
                del out, upstream
                if below is not None:
                    below.put(k, got.pop(0))
                per_batch = {}
                for j in order:
                    g = got[j]
                    name, p = chosen[j]
                    per_batch[name] = g
                    if ring is None:
                        p.grad = _grad_add(p.grad, g)
                if ring is not None and batch.at is not None:
                    done = set(order)
                    ring.add(*batch.at, [got[j] if j in done else None for j in range(len(got))])
                if on_batch is not None:
                    on_batch(i, k, module, per_batch)
                del hidden, got, per_batch
            if ring is not None:
                for p, total in zip(params, ring.result(), strict=True):
                    p.grad = total
        finally:
            for h in handles:
                h.remove()

    def _backward_sharded(
        self,
        i: int,
        module: nn.Module,
        units: list[nn.Module],
        chosen: list[tuple[str, nn.Parameter]],
        states: States,
        grads: StateCache,
        below: StateCache | None,
        on_batch: Callable[[int, int, nn.Module, dict[str, torch.Tensor]], None] | None,
    ) -> None:
        """`_backward_layer` on a sharded layer (`executor.sharding`), every batch on
        every process: each batch's backward leaves its sharded gradients in `.grad`
        (each process's own chunk of the gradient all computed alike:
        `sharding.OwnChunk`), which are added to the
        running sums element by element in batch order, as `_backward_layer` adds the
        whole ones (without `on_batch`, FSDP adds them to `.grad` itself, the same
        element-wise addition, and no batch's gradients are kept beside the sums);
        `on_batch` gets them in autograd's order, each gathered when read
        (`sharding.Gathered`); the input's gradient goes to `below`."""
        params = [p for _, p in chosen]
        sums: list[torch.Tensor | None] = [None] * len(params)
        order = sharding.AutogradOrder(module, units, {name for name, _ in chosen})
        try:
            for k, batch in enumerate(states.batches):
                hidden = self._swept_input(states, k, below is not None)
                if on_batch is not None:  # each batch's own gradients, summed here
                    for p in params:
                        p.grad = None
                with order.batch() as seen, torch.enable_grad():
                    out = _layer_output(module, i, hidden, batch)
                    out.backward(grads.get(k, self.device))
                    del out
                if below is not None:
                    assert hidden.grad is not None
                    below.put(k, hidden.grad)
                if on_batch is not None:
                    got = {name: p.grad for name, p in chosen}
                    for j, p in enumerate(params):
                        if p.grad is not None:
                            sums[j] = _grad_add(sums[j], p.grad)
                    per_batch = {name: got[name] for name in seen if got[name] is not None}
                    on_batch(i, k, module, sharding.Gathered(per_batch))  # type: ignore[arg-type]
                    del got, per_batch
                del hidden
        finally:
            order.close()
        if on_batch is not None:
            for p, total in zip(params, sums, strict=True):
                p.grad = total

    def _check_final(self, states: States) -> None:
        if states.layer != self.num_layers:
            raise ValueError(
                f"these states are the input of layer {states.layer}; "
                f"the head needs the output of all {self.num_layers}"
            )


def _layer_output(module: nn.Module, i: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Decoder layer i (`module`) on one batch's input: its output states (the first
    element where the layer returns a tuple), with the batch's recorded call arguments."""
    out = module(hidden, *batch.args[i], **batch.kwargs[i])
    return out[0] if isinstance(out, tuple) else out


def _wanted(wants: Callable[[int, str], bool] | None, i: int, name: str) -> bool:
    return wants is None or wants(i, name)


def _grad_add(total: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """How autograd's `.grad` takes one more batch (the first: a copy)."""
    return g.clone() if total is None else total.add_(g)


def _weighted_mean(terms: Sequence[tuple[float, int]]) -> float:
    """The mean of per-batch (loss x predicted tokens, predicted tokens), summed in
    batch order: this process's batches, or under torchrun every process's in global
    batch order (`distributed.replay`, a collective)."""
    total, count = 0.0, 0

    def add(term: tuple[float, int]) -> None:
        nonlocal total, count
        total += term[0]
        count += term[1]

    distributed.replay(terms, add)
    return total / count if count else float("nan")


def _note(order: list[int], j: int, grad: torch.Tensor) -> None:
    """A parameter hook: record that parameter j's gradient was computed."""
    order.append(j)


def _head_modules(model: nn.Module) -> list[str]:
    """Dotted names of the modules the head step owns: the final norm, then the LM head."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    base = getattr(model, "base_model", None)
    for attr in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(base, attr, None) if base is not None else None
        if isinstance(norm, nn.Module):
            out.append(names[id(norm)])
            break
    head = model.get_output_embeddings()
    if head is not None:
        out.append(names[id(head)])
    return out


def _tied_names(model: nn.Module) -> dict[str, str]:
    """For each parameter sharing storage with another (tied embeddings): that other's name."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    out = {}
    for names in by_id.values():
        for n in names:
            for other in names:
                if other != n:
                    out.setdefault(n, other)
    return out
