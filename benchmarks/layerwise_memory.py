"""Peak memory of the layer-wise walk (`executor.layerwise`) against the layer count.

Writes synthetic checkpoints with Llama-3-8B-shaped decoder layers (hidden
4096, MLP 14336, 32 query heads : 8 KV heads of 128, vocabulary 128256,
untied head, bf16, random values) streaming, one tensor at a time, one shard
per layer (plus one for the embedding and one for the final norm and head), so
the writer never holds more than one tensor. The checkpoints of 0, 4, 8 and 16
layers share the shards of the first layers through symbolic links (one set of
files on disk); `--whole` adds the 32-layer one (16 GB), deleted afterwards
unless `--keep`.

Each run is a fresh subprocess that walks `--windows` windows of `--tokens`
random tokens through every layer and computes the mean next-token loss,
while a thread samples `RssAnon` from /proc/self/status every 2 ms (the walk
maps the files, so the page cache shows up in VmRSS and VmHWM; anonymous
memory is what the process itself holds). The table compares the peak with

    formula = base + one layer + state cache + max(embedding, head)

all in the compute dtype (`--dtype`, default float32 as the planner runs on a
CPU), where base is the RssAnon of the 0-layer run right after
`LayerWalk.open` (interpreter, torch, transformers, the skeleton; nothing
loaded). Targets (issue 36): flat in the layer count, at most 1.3 x the
formula, the whole 32-layer model under 4 GB.

With `--analyze` each run is instead a whole `plangen analyze --offload
--strategy S` (default flap: calibration walk, FLAP scores, the candidate and the
original judged on one held-out window in one walk, the plan and sidecar
written; the SmolLM2 demo tokenizer is copied beside the weights). `--metric`
picks the strategy's metric: a gradient one (`--strategy global --metric
taylor`) adds the reverse sweep, each layer reloaded, recomputed from its
stored input and back-propagated, every layer boundary kept. `--offload-dir DIR`
keeps the states between layers on disk under DIR (`--offload DIR`) instead of
in memory. The peak is compared with the formula the README states,
`plangen.memory.Footprint.layerwise` with the arguments analyze's own
`placement` call received (its footprint, calibration tokens, gradients or not,
states on disk or not): 256 MiB + one layer (x 3 with gradients) + its largest
weight in float64 + max(embedding, head) + the state boundaries (two, layers + 1
with gradients, none on disk), added to the RssAnon the process had before
analyze ran. The peak is also given per stage (`PHASES`: the calibration walk,
the reverse sweep within it, a layer's width scoring within either, the held-out
judge, and the largest of the rest:
the checks and weights digest, the windows, opening the walk, the candidates,
the writing; each one's peak is in the raw result printed on stderr), to say
which holds it; `--census 1` adds, as each stage starts, the bytes of the CPU
tensors Python holds (`tensor_census`), to tell held tensors from allocator slack.

Usage: python benchmarks/layerwise_memory.py [--dir /tmp/plancc-layerwise] [--whole]
           [--layers 0,4,8,16] [--dtype float32] [--tokens 256] [--analyze]
           [--strategy flap] [--metric NAME] [--offload-dir DIR] [--out FILE.md]

`--child DIR` (internal, also used by tests/executor/test_layerwise.py) runs one
measurement in this process and prints one JSON line; `--mode whole` loads the
checkpoint with `AutoModelForCausalLM.from_pretrained` instead, and
`--data-limit BYTES` sets RLIMIT_DATA first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_UNIFORM_HALF_WIDTH = 0.02 * 3**0.5  # U(-a, a) has standard deviation a / sqrt(3)

# Llama-3-8B's shapes.
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}


def llama_config(layers: int, **shape: int) -> dict[str, Any]:
    """A Llama config.json with `layers` decoder layers and the given shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        **shape,
    }


def _layer_shapes(c: dict[str, Any], i: int) -> dict[str, tuple[int, ...]]:
    h, f = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


def _shard_shapes(c: dict[str, Any], shard: str) -> dict[str, tuple[int, ...]]:
    if shard == "embed":
        return {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"])}
    if shard == "head":
        return {
            "model.norm.weight": (c["hidden_size"],),
            "lm_head.weight": (c["vocab_size"], c["hidden_size"]),
        }
    return _layer_shapes(c, int(shard))


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """One bf16 safetensors file, header first, then each tensor generated and written
    alone (norms 1, matrices uniform with standard deviation 0.02, in row blocks
    of at most 64M values: uniform draws are several times faster than normal ones)."""
    import numpy as np
    import torch

    from executor.safetensors_io import OutEntry, SourceFiles, write_file

    g = torch.Generator().manual_seed(seed)

    def produce(shape: tuple[int, ...]) -> Any:
        def make() -> np.ndarray:
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy()
            out = torch.empty(shape, dtype=torch.bfloat16)
            rows = max(1, (64 << 20) // shape[1])
            for s in range(0, shape[0], rows):
                block = torch.rand((min(rows, shape[0] - s), shape[1]), generator=g)
                out[s : s + rows] = block.sub_(0.5).mul_(2 * _UNIFORM_HALF_WIDTH)
            return out.view(torch.int16).numpy()

        return make

    entries = [OutEntry(n, "BF16", s, produce=produce(s)) for n, s in shapes.items()]
    tmp = path.with_name(path.name + ".tmp")
    with SourceFiles() as files:
        write_file(tmp, entries, files)
    tmp.rename(path)


def build(root: Path, layers: int, shape: dict[str, int] | None = None) -> Path:
    """The `layers`-layer checkpoint under root (shards written once into root/shards,
    linked from each checkpoint's directory); returns its directory."""
    c = llama_config(layers, **(shape or LLAMA3_8B))
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    names = ["embed", *(str(i) for i in range(layers)), "head"]
    for k, name in enumerate(names):
        f = shards_dir / f"{name}.safetensors"
        if not f.exists():
            _write_shard(f, _shard_shapes(c, name), seed=k if name != "head" else 10_000)
    out = root / f"layers-{layers}"
    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for name in names:
        file = f"{name}.safetensors"
        link = out / file
        if not link.exists():
            link.symlink_to(shards_dir / file)
        weight_map.update(dict.fromkeys(_shard_shapes(c, name), file))
    (out / "config.json").write_text(json.dumps(c, indent=2))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(os.path.getsize(p) for p in model_dir.glob("*.safetensors"))


# --------------------------------------------------------------------------- child


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmData", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """A thread sampling /proc/self/status every `interval` seconds: peak RssAnon, VmData."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = {"RssAnon": 0, "VmData": 0}
        self.phase = "start"
        self.phase_peak: dict[str, int] = {}  # peak RssAnon while each phase ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> dict[str, int]:
        now = _status()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], now[k])
        phase = self.phase
        self.phase_peak[phase] = max(self.phase_peak.get(phase, 0), now["RssAnon"])
        return now

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (see the module docstring)."""
    if args.data_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (args.data_limit, args.data_limit))
    with PeakSampler() as sampler:
        import torch

        torch.manual_seed(0)
        dtype = getattr(torch, args.dtype)
        started = time.perf_counter()
        result: dict[str, Any] = {"mode": args.mode}
        try:
            if args.mode == "analyze":
                result.update(_analyze(args, sampler))
            elif args.mode == "walk":
                from executor.layerwise import LayerWalk

                walk = LayerWalk.open(args.child, dtype=dtype, batch_size=args.windows)
                result["base"] = sampler.sample()["RssAnon"]
                vocab = walk.config.vocab_size
                windows = torch.randint(3, vocab, (args.windows, args.tokens))
                with walk:
                    sampler.enter("embedding")
                    states = walk.inputs(windows)
                    sampler.enter("layers")
                    for i in range(walk.num_layers):
                        with walk.layer(i) as module:
                            states = walk.forward_layer(i, states, module, inplace=True)
                    sampler.enter("head")
                    result["loss"] = walk.loss(states)
                    sampler.enter("end")
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(args.child, dtype=dtype).eval()
                result["base"] = None
                windows = torch.randint(3, model.config.vocab_size, (args.windows, args.tokens))
                with torch.no_grad():
                    out = model(input_ids=windows, labels=windows, use_cache=False)
                result["loss"] = float(out.loss)
            result["ok"] = True
        except MemoryError as exc:  # RLIMIT_DATA refused an allocation
            result.update(ok=False, error=f"MemoryError: {exc}"[:300])
        except RuntimeError as exc:  # torch reports a failed allocation as RuntimeError
            result.update(ok=False, error=f"RuntimeError: {exc}"[:300])
        result["seconds"] = time.perf_counter() - started
    result["peak_anon"] = sampler.peak["RssAnon"]
    result["peak_data"] = sampler.peak["VmData"]
    result["phase_peak"] = sampler.phase_peak
    return result


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEMO_MODEL = Path.home() / ".cache" / "plancc" / "SmolLM2-135M-Instruct"


def with_demo_tokenizer(model_dir: Path) -> None:
    """The SmolLM2 demo tokenizer copied beside a synthetic checkpoint (analyze reads
    text), unless it is there."""
    for name in TOKENIZER_FILES:
        if not (model_dir / name).exists():
            shutil.copy(DEMO_MODEL / name, model_dir / name)


def _analyze(args: argparse.Namespace, sampler: PeakSampler) -> dict[str, Any]:
    """`plangen analyze --offload [DIR] --strategy S [--metric M]` on the checkpoint, in
    this process; the formula from the arguments of analyze's own `placement` call."""
    from plangen import memory
    from plangen.analyze import run
    from plangen.options import Options

    placed: dict[str, Any] = {}
    placement = memory.placement

    def recorded(*a: Any, **kw: Any) -> memory.Placement:
        names = ("offload", "memory_check", "device", "dtype", "footprint", "tokens")
        placed.update(zip((*names, "gradients"), a, strict=False), **kw)
        out = placement(*a, **kw)
        placed["placement"] = out
        return out

    model_dir = Path(args.child)
    with_demo_tokenizer(model_dir)
    base = sampler.sample()["RssAnon"]
    plan = model_dir.parent / f"{model_dir.name}.prn"
    opts = Options(
        model_dir=model_dir,
        output=plan,
        force=True,
        strategy=args.strategy,
        metric=args.metric,
        nsamples=args.windows,
        seqlen=args.tokens,
        heldout=1,
        batch_size=args.windows,
        device=args.device,
        dtype=args.dtype,
        offload=None if args.in_memory else (args.offload_dir or ""),
        memory_check=not args.in_memory,  # in memory as asked, unchecked
        quiet=True,
    )
    census: dict[str, Any] | None = {} if args.census else None
    memory.placement = recorded
    try:
        with _phases(sampler, census):
            out = run(opts)
    finally:
        memory.placement = placement
    width = 2 if args.dtype == "bfloat16" else 4
    on_disk = isinstance(placed["placement"].states, Path)
    if args.in_memory:
        stated = placed["footprint"].in_memory(width, placed["gradients"])
    else:
        stated = placed["footprint"].layerwise(
            width, placed["tokens"], placed["gradients"], on_disk=on_disk
        )
    device: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        import torch

        device = {"device_peak": torch.cuda.max_memory_allocated(), "device": args.device}
    return {
        "base": base,
        "loss": out.loss_before,
        "formula": base + stated,
        "gradients": placed["gradients"],
        "on_disk": on_disk,
        "in_memory": bool(args.in_memory),
        **device,
        **({"census": census} if census is not None else {}),
    }


PHASES = (  # (module, owner, attribute, phase): the stages `--analyze` reports peaks of
    ("plangen.analyze", None, "_checked", "check"),  # options, checkpoint, weights digest
    ("plangen.analyze", None, "_read_windows", "windows"),
    ("plangen.analyze", None, "_load", "open"),
    ("plangen.calibrate", None, "collect", "calibrate"),
    ("executor.layerwise", "LayerWalk", "backward_sweep", "sweep"),
    ("plangen.calibrate", "_Scoring", "__call__", "score"),  # a layer's width scores
    ("plangen.heldout", None, "judge", "judge"),
    ("plangen.analyze", None, "write_outputs", "write"),
)
MAIN_PHASES = ("calibrate", "sweep", "score", "judge")  # the table's columns; the others: "rest"


def tensor_census(top: int = 6) -> dict[str, Any]:
    """The CPU tensors Python holds now (their storages, each counted once): total
    bytes and the `top` (shape, dtype) groups by bytes; this process's RssAnon, and
    again after `malloc_trim(0)` (which returns glibc's free pages: changes what follows)."""
    import gc

    import torch

    seen: set[int] = set()
    groups: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except Exception:  # a tensor without storage (sparse, wrapper subclasses)
            continue
        if ptr in seen or ptr == 0:
            continue
        seen.add(ptr)
        key = f"{tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
        g = groups.setdefault(key, [0, 0])
        g[0] += 1
        g[1] += storage.nbytes()
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    rss = _status()["RssAnon"]
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc holds free but resident
    return {
        "rss_anon": rss,
        "rss_anon_after_malloc_trim": _status()["RssAnon"],
        "tensor_bytes": sum(g[1] for g in groups.values()),
        "tensors": len(seen),
        "top": [f"{n} x {k}: {b / 1e6:.1f} MB" for k, (n, b) in ranked],
    }


@contextlib.contextmanager
def _phases(sampler: PeakSampler, census: dict[str, Any] | None = None) -> Iterator[None]:
    """While analyze runs: `sampler`'s phase is the stage running (PHASES; "other"
    outside them), so that `phase_peak` says which stage held the peak; with `census`,
    `tensor_census()` as each stage starts, by stage."""
    import importlib

    def marked(fn: Any, phase: str) -> Any:
        @functools.wraps(fn)
        def call(*a: Any, **kw: Any) -> Any:
            before = sampler.phase
            if census is not None:
                census[phase] = tensor_census()
            sampler.enter(phase)
            try:
                return fn(*a, **kw)
            finally:
                sampler.enter(before)

        return call

    patched = []
    for module, owner, attr, phase in PHASES:
        target = importlib.import_module(module)
        if owner is not None:
            target = getattr(target, owner)
        original = getattr(target, attr)
        patched.append((target, attr, original))
        setattr(target, attr, marked(original, phase))
    sampler.enter("other")
    try:
        yield
    finally:
        sampler.enter("end")
        for target, attr, original in patched:
            setattr(target, attr, original)


def run_child(model_dir: Path, **opts: Any) -> dict[str, Any]:
    """Run `child` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir)]
    for k, v in opts.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- table


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    root = Path(args.dir)
    layers = [int(x) for x in args.layers.split(",")]
    if args.whole:
        layers.append(32)
    item = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    c = LLAMA3_8B
    layer_params = sum(
        (lambda s: s[0] * (s[1] if len(s) > 1 else 1))(s) for s in _layer_shapes(c, 0).values()
    )
    layer_bytes = layer_params * item
    head_bytes = c["vocab_size"] * c["hidden_size"] * item
    state_bytes = args.windows * args.tokens * c["hidden_size"] * item
    rows = []
    base = None
    for n in sorted(set([0, *layers])):
        t0 = time.perf_counter()
        model_dir = build(root, n)
        write_s = time.perf_counter() - t0
        mode = "analyze" if args.analyze else "walk"
        if args.analyze and n == 0:
            continue  # analyze needs a layer; its formula holds its own base
        extra = (
            {
                "strategy": args.strategy,
                "metric": args.metric,
                "offload_dir": args.offload_dir,
                "census": 1 if args.census else None,
                "device": args.device,
                "in_memory": 1 if args.in_memory else None,
            }
            if args.analyze
            else {}
        )
        r = run_child(
            model_dir,
            mode=mode,
            dtype=args.dtype,
            tokens=args.tokens,
            windows=args.windows,
            **extra,
        )
        if not r.get("ok"):
            raise SystemExit(f"{n} layers: {r.get('error')}")
        print(json.dumps({"layers": n, **r}), file=sys.stderr, flush=True)  # the raw result
        if n == 0 or args.analyze:
            base = r["base"]
        assert base is not None
        formula = base + (layer_bytes if n else 0) + state_bytes + head_bytes
        if args.analyze:
            formula = r["formula"]
        # The layer and the head are never loaded together: the tighter bound.
        tight = base + max(layer_bytes if n else 0, head_bytes) + state_bytes
        row = {
            "layers": n,
            "checkpoint": checkpoint_bytes(model_dir),
            "peak_anon": r["peak_anon"],
            "base_this_run": r["base"],
            "formula": formula,
            "ratio": r["peak_anon"] / formula,
            "tight_ratio": r["peak_anon"] / tight,
            "layers_peak": r["phase_peak"].get("layers", 0),
            "layers_formula": base + (layer_bytes if n else 0) + state_bytes,
            "seconds": r["seconds"],
            "write_s": write_s,
            "loss": r["loss"],
            "phase_peak": r["phase_peak"],
            "gradients": r.get("gradients", False),
            "on_disk": r.get("on_disk", False),
            "in_memory": r.get("in_memory", False),
            "device_peak": r.get("device_peak"),
        }
        rows.append(row)
        print(_analyze_row(row, args) if args.analyze else _row(row), flush=True)
        if n == 32 and not args.keep:
            shutil.rmtree(model_dir)
            for i in range(16, 32):
                (root / "shards" / f"{i}.safetensors").unlink(missing_ok=True)
    return rows


HEADER = (
    "| layers | checkpoint GB | peak RssAnon GB | formula GB | ratio | ratio to max form "
    "| layer loop: peak / base+layer+states GB | walk s | loss |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['layers']} | {_gb(r['checkpoint'])} | {_gb(r['peak_anon'])} | "
        f"{_gb(r['formula'])} | {r['ratio']:.2f} | {r['tight_ratio']:.2f} | "
        f"{_gb(r['layers_peak'])} / {_gb(r['layers_formula'])} | "
        f"{r['seconds']:.1f} | {r['loss']:.3f} |"
    )


ANALYZE_HEADER = (
    "| layers | checkpoint GB | strategy / metric | states | peak RssAnon GB | formula GB "
    "| peak / formula | calibrate / sweep / score / judge / rest peak GB | analyze s "
    "| device peak GB |\n"
    "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"
)


def _analyze_row(r: dict[str, Any], args: argparse.Namespace) -> str:
    what = args.strategy + (f" / {args.metric}" if args.metric else "")
    what += " (gradients)" if r["gradients"] else ""
    peaks = r["phase_peak"]
    rest = max((v for k, v in peaks.items() if k not in MAIN_PHASES), default=0)
    phases = " / ".join(_gb(peaks[k]) if k in peaks else "-" for k in MAIN_PHASES)
    phases += f" / {_gb(rest)}"
    states = "whole model" if r["in_memory"] else ("disk" if r["on_disk"] else "memory")
    device = "-" if r["device_peak"] is None else _gb(r["device_peak"])
    return (
        f"| {r['layers']} | {_gb(r['checkpoint'])} | {what} | "
        f"{states} | {_gb(r['peak_anon'])} | "
        f"{_gb(r['formula'])} | {r['ratio']:.2f} | {phases} | {r['seconds']:.1f} | {device} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/plancc-layerwise")
    p.add_argument("--layers", default="4,8,16")
    p.add_argument("--whole", action="store_true", help="also the 32-layer (16 GB) checkpoint")
    p.add_argument("--keep", action="store_true", help="keep the 32-layer shards")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--out", help="write the table (markdown) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument(
        "--analyze", action="store_true", help="measure plangen analyze --offload, not the walk"
    )
    p.add_argument(
        "--mode", default="walk", choices=("walk", "whole", "analyze"), help=argparse.SUPPRESS
    )
    p.add_argument("--data-limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="flap", help="with --analyze: analyze's --strategy")
    p.add_argument("--metric", help="with --analyze: analyze's --metric (default: its own)")
    p.add_argument(
        "--census",
        type=int,
        default=0,
        help="with --analyze: the tensors held as each stage starts (in the raw result)",
    )
    p.add_argument("--offload-dir", help="with --analyze: the states on disk under this directory")
    p.add_argument(
        "--device",
        default="cpu",
        help="with --analyze: analyze's --device (cuda: the peak device memory, "
        "torch.cuda.max_memory_allocated, is reported too)",
    )
    p.add_argument(
        "--in-memory",
        type=int,
        default=0,
        help="with --analyze, 1: the model loaded whole (no --offload; the memory check "
        "off), to compare the layer-wise run with",
    )
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    print(ANALYZE_HEADER if args.analyze else HEADER, flush=True)
    rows = measure(args)
    if args.out:
        _write_result(Path(args.out), args, rows)


def _write_result(path: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    cmd = "python benchmarks/layerwise_memory.py " + " ".join(sys.argv[1:])
    lines = [
        "# plangen analyze --offload: peak memory against the layer count"
        if args.analyze
        else "# Layer-wise walk: peak memory against the layer count",
        "",
        f"Command: `{cmd}`; commit {commit}; {datetime.date.today().isoformat()}; "
        f"{os.cpu_count()} CPU cores; compute dtype {args.dtype}; "
        f"{args.windows} x {args.tokens} tokens.",
        "",
        ANALYZE_HEADER if args.analyze else HEADER,
        *(_analyze_row(r, args) if args.analyze else _row(r) for r in rows),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
