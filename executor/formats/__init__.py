"""Output formats of `plancc apply --format` and `plancc export`.

- `hf`: Hugging Face safetensors + config.json. A result stock transformers
  describes is an ordinary checkpoint; any other carries per-layer widths
  under the `plancc` key and loads with `executor.load` only
  (`executor.configs`: stock loaders refuse it by name).
- `nemotron-nas`: the same tensors with a Nemotron-NAS (DeciLM) config.json
  and plancc's own modeling code, for vLLM and transformers
  (`executor.formats.nemotron_nas`).
- `gguf`: one GGUF file for llama.cpp (`executor.formats.gguf`, imported
  only when asked for).
"""

from __future__ import annotations

from typing import Any

FORMATS = ("hf", "nemotron-nas", "gguf")
GGUF_DTYPES = ("f16", "bf16", "f32")
GGUF_FILE = "model.gguf"  # where apply (beside A) and export (in DIR) put the GGUF file


def choose(requested: str | None, stock_loadable: bool, nemotron_problem: str | None) -> str:
    """The format apply writes A in: the requested one, else `hf` when stock transformers
    loads the result, else `nemotron-nas` when the result fits that layout, else `hf`
    (plancc's own layout, for executor.load). `gguf` writes A as `hf` plus the GGUF file."""
    if requested is not None:
        return requested
    if stock_loadable or nemotron_problem is not None:
        return "hf"
    return "nemotron-nas"


def gguf_writer() -> Any:
    """`executor.formats.gguf.write_gguf(a_dir, out, dtype)`, imported only when asked for."""
    try:
        from executor.formats.gguf import write_gguf
    except ImportError as exc:
        raise ImportError(f"this plancc has no GGUF writer ({exc})") from None
    return write_gguf
