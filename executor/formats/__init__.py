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

FORMATS = ("hf", "nemotron-nas", "gguf")
GGUF_DTYPES = ("f16", "bf16", "f32")
