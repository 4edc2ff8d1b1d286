"""Write an apply result as one GGUF file that llama.cpp runs.

llama.cpp has two graphs for the Llama layout: `llama` (every layer the same
shape) and `deci` (NVIDIA's Nemotron-NAS: per-layer head counts and MLP widths
as arrays in the file). A uniform result is written as `llama` (what every
llama.cpp tool knows), a heterogeneous one as `deci`. What the conversion does,
as llama.cpp's own `convert_hf_to_gguf.py` does it:

* tensor names from gguf-py's tensor map (`blk.N.attn_q.weight`, ...);
* Q and K rows permuted from Hugging Face's rotate-half RoPE layout to GGML's
  interleaved one, per head (Q with the layer's query heads, K with its KV
  heads), weights and biases alike;
* 1-D tensors (norms, biases) always F32, matrices in the requested dtype;
  quantizing is `llama-quantize`'s job, afterwards;
* a tied head is not written (llama.cpp reuses `token_embd`);
* Llama 3 RoPE scaling as the `rope_freqs` tensor, linear scaling as keys;
* the tokenizer (`executor.formats.gguf_vocab`).

Streaming: only tensor metadata is gathered first (from the safetensors
headers); the data are then read, converted and written one tensor at a time,
so peak memory is about one tensor, whatever the model size. The file is
written beside `out` and renamed into place at the end: a failure leaves no
half-written GGUF.

What llama.cpp cannot run is refused before anything is written, by one
function, `gguf_problems` (a `GGUFUnsupported` carrying every rule broken and
its fix).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.architectures import Architecture, architecture_for_model_type, read_facts
from compiler.checkpoint import TensorInfo, read_config, tensor_index
from compiler.targets import TARGETS
from executor.family_config import PLANCC_KEY, model_config
from executor.safetensors_io import SourceFiles, decode, read_raw

DTYPES = ("f16", "bf16", "f32")
# Families whose decoder layer is exactly llama.cpp's `llama`/`deci` layer
# (RMSNorm, rotate-half RoPE, GQA attention, SiLU-gated MLP).
# The families llama.cpp runs, from the serving-target table (one source of truth).
GGUF_FAMILIES = tuple(TARGETS["llamacpp"].families)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Problem:
    """One thing llama.cpp cannot run, and what to do instead."""

    rule: str
    fix: str

    def __str__(self) -> str:
        return f"{self.rule} (fix: {self.fix})"


class GGUFUnsupported(ValueError):
    """The result cannot be written as a GGUF llama.cpp runs; nothing was written."""

    def __init__(self, where: Path | str, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: cannot be written as GGUF for llama.cpp:\n{lines}")


@dataclass(frozen=True)
class GGUFLayer:
    """The widths of one layer as the GGUF file states them."""

    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class GGUFInfo:
    """What `write_gguf` wrote."""

    path: Path
    arch: str  # "llama" or "deci"
    dtype: str
    tensors: int
    bytes: int  # file size
    layers: tuple[GGUFLayer, ...]
    head_dim: int
    context_length: int
    tokenizer_pre: str


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != PLANCC_KEY}


def layer_widths(arch: Architecture, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The facts of every layer: the top-level config overridden by its `plancc` record."""
    base = _plain_config(config)
    records = (config.get(PLANCC_KEY) or {}).get("layers")
    if not records:
        return [read_facts(arch, base)] * int(read_facts(arch, base)["layers"])
    return [read_facts(arch, {**base, **(rec.get("config") or {})}) for rec in records]


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either spelling: transformers 5's `rope_parameters` or the
    legacy `rope_theta` + `rope_scaling` keys (`type` is the old name of `rope_type`)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def gguf_problems(
    config: Mapping[str, Any], index: Mapping[str, TensorInfo], a_dir: Path | None = None
) -> list[Problem]:
    """Every reason llama.cpp cannot run this model (empty: it can).

    The one place the GGUF rules live, so a target rule table can point here.
    `a_dir`, when given, also has its tokenizer checked.
    """
    from executor.formats.gguf_vocab import tokenizer_kind_problem

    problems: list[Problem] = []
    model_type = config.get("model_type")
    arch = architecture_for_model_type(str(model_type))
    if arch is None or arch.name not in GGUF_FAMILIES:
        return [
            Problem(
                f"model_type {model_type!r}: only the Llama layout "
                f"({', '.join(GGUF_FAMILIES)}) is written to GGUF; MoE and other families "
                "need llama.cpp graphs this writer does not target",
                "serve it with transformers or vLLM instead",
            )
        ]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        problems.append(
            Problem(f"hidden_act {act!r}: llama.cpp's Llama graph is SiLU-gated", "none")
        )
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        problems.append(
            Problem(
                f"RoPE type {rope['rope_type']!r} is not written (known: {', '.join(ROPE_TYPES)})",
                "serve it with transformers or vLLM instead",
            )
        )
    for j, facts in enumerate(layer_widths(arch, config)):
        heads, kv, ffn = facts.get("heads", 0), facts.get("kv_heads", 0), facts.get("ffn", 0)
        if not heads or not kv or not ffn:
            problems.append(
                Problem(
                    f"layer {j} has {heads} heads, {kv} KV heads, MLP width {ffn}: llama.cpp's "
                    "`deci` graph mishandles layers without attention or MLP",
                    "keep at least one KV group and some MLP width in every layer",
                )
            )
        elif heads % kv:
            problems.append(
                Problem(
                    f"layer {j}: {heads} query heads do not split evenly over {kv} KV heads",
                    "drop whole KV groups (`attn layers ... drop groups`)",
                )
            )
    tied = read_facts(arch, _plain_config(config)).get("tied")
    if not tied and "lm_head.weight" not in index:
        problems.append(
            Problem(
                "config.json says the head is untied but lm_head.weight is missing (llama.cpp "
                "would silently reuse the embeddings)",
                "re-run `plancc apply`; the directory is incomplete",
            )
        )
    unmapped = [n for n in index if _gguf_name(n, 1 + _max_layer(index)) is None]
    if unmapped:
        problems.append(
            Problem(
                f"{len(unmapped)} tensor(s) have no llama.cpp counterpart (first: {unmapped[0]!r})",
                "write the model for transformers or vLLM instead",
            )
        )
    if a_dir is not None:
        why = tokenizer_kind_problem(a_dir)
        if why:
            problems.append(
                Problem(why, "copy the original model's tokenizer files into the directory")
            )
    return problems


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _max_layer(index: Mapping[str, Any]) -> int:
    found = [int(m.group(1)) for n in index if (m := _LAYER.match(n))]
    return max(found, default=-1)


def _gguf_name(hf_name: str, blocks: int) -> str | None:
    """llama.cpp's name for a Hugging Face tensor name (gguf-py's map; None: unknown)."""
    import gguf

    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, max(blocks, 1))
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_rows(w: Any, heads: int) -> Any:
    """Hugging Face's rotate-half Q/K rows to GGML's interleaved RoPE order, per head
    (llama.cpp's converter `LlamaModel.permute`); works on weights and biases."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_rows(w: Any, heads: int) -> Any:
    """The inverse of `permute_rows`: GGML rows back to Hugging Face's order."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> list[float]:
    """The `rope_freqs` llama.cpp multiplies Llama 3's RoPE frequencies by (the
    converter's `generate_extra_tensors`, same formula as transformers' llama3 RoPE)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for k in range(0, head_dim, 2):
        freq = 1.0 / (base ** (k / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@dataclass(frozen=True)
class _Job:
    """One tensor to write: where it comes from and how it is stored."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy (row-major) order
    dtype: str  # f16 | bf16 | f32
    source: str | None  # Hugging Face name, or None with `values`
    heads: int | None = None  # Q/K: heads to permute by
    values: tuple[float, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "f32" else 2)


def _plan_tensors(
    index: Mapping[str, TensorInfo],
    layers: list[GGUFLayer],
    head_dim: int,
    dtype: str,
    rope_factors: list[float] | None,
) -> list[_Job]:
    """The tensors of the GGUF file, in order, each checked against its layer's widths."""
    from compiler.checkpoint import CheckpointError

    blocks = len(layers)
    jobs: list[_Job] = []
    if rope_factors is not None:
        jobs.append(
            _Job("rope_freqs.weight", (len(rope_factors),), "f32", None, None, tuple(rope_factors))
        )

    def order(name: str) -> tuple[int, int, str]:
        m = _LAYER.match(name)
        if m:
            return (1, int(m.group(1)), name)
        return (0 if "embed_tokens" in name else 2, 0, name)

    for hf in sorted(index, key=order):
        info = index[hf]
        name = _gguf_name(hf, blocks)
        if name is None:
            continue
        shape = tuple(info.shape)
        heads = None
        m = _LAYER.match(hf)
        if m:
            j = int(m.group(1))
            if j >= blocks:
                raise CheckpointError(
                    f"{hf}: layer {j} is beyond the {blocks} layers config.json describes; "
                    "the directory is not a complete apply result"
                )
            lay = layers[j]
            rows = {
                "attn_q": lay.heads * head_dim,
                "attn_k": lay.kv_heads * head_dim,
                "attn_v": lay.kv_heads * head_dim,
                "ffn_gate": lay.ffn,
                "ffn_up": lay.ffn,
            }
            kind = name.split(".")[2]
            if kind in rows and shape[0] != rows[kind]:
                raise CheckpointError(
                    f"{hf} has shape {list(shape)}, config.json says {rows[kind]} rows for "
                    f"layer {j}; the tensors and config.json disagree"
                )
            heads = {"attn_q": lay.heads, "attn_k": lay.kv_heads}.get(kind)
        jobs.append(_Job(name, shape, dtype if len(shape) > 1 else "f32", hf, heads))
    return jobs


def _encode(t: Any, dtype: str) -> Any:
    """A torch tensor as the numpy array gguf-py writes (BF16 as its raw bytes)."""
    import torch

    if dtype == "f32":
        return t.to(torch.float32).contiguous().numpy()
    if dtype == "f16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()


def write_gguf(
    a_dir: str | Path, out: str | Path, dtype: str = "f16", *, tokenizer_pre: str | None = None
) -> GGUFInfo:
    """Write the apply result in `a_dir` (config.json, safetensors, tokenizer) to the GGUF
    file `out`, with matrices in `dtype` (f16, bf16 or f32).

    `tokenizer_pre` names llama.cpp's pre-tokenizer for a tokenizer its table does not
    know (None: detected as llama.cpp's converter does). Raises GGUFUnsupported (nothing
    written) for what llama.cpp cannot run, CheckpointError for an unreadable directory.
    """
    import gguf

    from executor.formats.gguf_vocab import VocabError, add_vocab, read_vocab

    a_dir, out = Path(a_dir), Path(out)
    _check_dtype(dtype, out)
    config = model_config(read_config(a_dir))  # the family's config, in every layout
    index = tensor_index(a_dir)
    problems = gguf_problems(config, index, a_dir)
    if problems:
        raise GGUFUnsupported(a_dir, problems)
    arch = architecture_for_model_type(config["model_type"])
    assert arch is not None
    layers = [
        GGUFLayer(int(f["heads"]), int(f["kv_heads"]), int(f["ffn"]))
        for f in layer_widths(arch, config)
    ]
    top = read_facts(arch, _plain_config(config))
    head_dim, hidden, vocab_size = int(top["head_dim"]), int(top["hidden"]), int(top["vocab"])
    try:
        vocab = read_vocab(a_dir, vocab_size, tokenizer_pre)
    except VocabError as exc:
        raise GGUFUnsupported(a_dir, [Problem(str(exc), exc.fix)]) from None
    rope = rope_parameters(config)
    factors = llama3_rope_factors(rope, head_dim) if rope["rope_type"] == "llama3" else None
    jobs = _plan_tensors(index, layers, head_dim, dtype, factors)
    uniform = all(lay == layers[0] for lay in layers)
    name = "llama" if uniform else "deci"
    context = _context_length(config)

    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, name)
    try:
        writer.add_name(config.get("_name_or_path") or a_dir.resolve().name)
        _add_model_kv(writer, config, layers, uniform, context, hidden, head_dim, rope)
        writer.add_vocab_size(vocab_size)
        _add_file_type(writer, dtype)
        add_vocab(writer, vocab)
        _add_tensor_infos(writer, jobs)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with SourceFiles() as files:
            for job in jobs:
                writer.write_tensor_data(_load(job, index, a_dir, files))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFInfo(
        path=out,
        arch=name,
        dtype=dtype,
        tensors=len(jobs),
        bytes=out.stat().st_size,
        layers=tuple(layers),
        head_dim=head_dim,
        context_length=context,
        tokenizer_pre=vocab.pre,
    )


def _check_dtype(dtype: str, out: Path) -> None:
    """Refuse an element type the writer has no encoding for, before anything is
    read: quantized types are llama-quantize's job, not this writer's."""
    if dtype not in DTYPES:
        raise GGUFUnsupported(
            out,
            [
                Problem(
                    f"dtype {dtype!r} is not written",
                    f"use one of {', '.join(DTYPES)}; quantize afterwards with llama-quantize",
                )
            ],
        )


def _context_length(config: Mapping[str, Any]) -> int:
    """The GGUF context length: max_position_embeddings (2048 when unset), capped at
    the sliding window when there is one."""
    context = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if isinstance(window, int) and 0 < window < context:
        # llama.cpp's graph has no sliding window: within the window it is exact.
        context = window
    return context


def _add_model_kv(
    writer: Any,
    config: Mapping[str, Any],
    layers: list[GGUFLayer],
    uniform: bool,
    context: int,
    hidden: int,
    head_dim: int,
    rope: Mapping[str, Any],
) -> None:
    """The model's shape keys: one width for a uniform model (`llama`), a per-layer
    list for a heterogeneous one (`deci`), then RoPE and the norm epsilon."""
    import gguf

    writer.add_block_count(len(layers))
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    pick: Callable[[str], Any] = (
        (lambda f: getattr(layers[0], f))
        if uniform
        else (lambda f: [getattr(x, f) for x in layers])
    )
    writer.add_feed_forward_length(pick("ffn"))
    writer.add_head_count(pick("heads"))
    writer.add_head_count_kv(pick("kv_heads"))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _add_file_type(writer: Any, dtype: str) -> None:
    """general.file_type for `dtype`, and the quantization version llama.cpp expects
    beside it."""
    import gguf

    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensor_infos(writer: Any, jobs: list[_Job]) -> None:
    """Every tensor's name, shape and type, declared before any data is written; a
    bf16 tensor goes in as raw bytes, since numpy has no bfloat16."""
    import gguf
    import numpy as np

    for job in jobs:
        if job.dtype == "bf16":
            byte_shape = (*job.shape[:-1], job.shape[-1] * 2)
            writer.add_tensor_info(
                job.name, byte_shape, np.dtype(np.uint8), job.nbytes,
                raw_dtype=gguf.GGMLQuantizationType.BF16,
            )  # fmt: skip
        else:
            np_dtype = np.dtype(np.float32 if job.dtype == "f32" else np.float16)
            writer.add_tensor_info(job.name, job.shape, np_dtype, job.nbytes)


def _load(job: _Job, index: Mapping[str, TensorInfo], a_dir: Path, files: SourceFiles) -> Any:
    """Read, permute and convert one tensor: the only tensor data held at a time. Reads
    go through `executor.safetensors_io` (pread into a reused buffer, no mmap), so the
    process does not keep the source pages mapped either."""
    import torch

    if job.source is None:
        return _encode(torch.tensor(job.values, dtype=torch.float32), job.dtype)
    info = index[job.source]
    t = decode(read_raw(files, a_dir / info.file, info), info.dtype)
    if job.heads is not None:
        t = permute_rows(t, job.heads)
    return _encode(t, job.dtype)
