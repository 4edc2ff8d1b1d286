"""`plancc apply --allow-pickle`: a pickle checkpoint converted to safetensors.

The executor reads safetensors byte ranges only, so a trusted pickle checkpoint
(`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`) is
first rewritten, shard by shard, into a temporary directory: one safetensors
file per pickle shard, same tensor names, dtypes, shapes and bytes. Tensors are
loaded with `torch.load(weights_only=True, mmap=True)`, so only one input
shard is in memory at a time and the restricted unpickler refuses anything but
tensors. Tied or shared tensors (one storage under two names) are cloned,
since safetensors refuses shared storage. Every other top-level file (config,
tokenizer, generation config) is copied. The result has the fingerprint that
`plangen header --allow-pickle` prints for the pickle files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from compiler.checkpoint import (
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    load_pickle_shard,
    pickle_shards,
    safetensors_dtype,
)
from executor.safetensors_io import shard_names


def _out_name(k: int, n: int) -> str:
    return shard_names(n)[k]


def convert_pickle_checkpoint(model_dir: Path, dest: Path) -> list[str]:
    """Write `model_dir`'s pickle weights as safetensors into `dest` (an existing,
    empty directory), plus its non-weight files; return the shard names written."""
    from safetensors.torch import save_file

    files = pickle_shards(model_dir)
    if not files:
        raise CheckpointError(
            f"{model_dir}: no pytorch_model.bin or {PICKLE_WEIGHTS_INDEX_NAME} to convert"
        )
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == PICKLE_WEIGHTS_INDEX_NAME:
            continue
        if p.name.endswith(PICKLE_SUFFIXES) or p.name.endswith(".safetensors"):
            continue
        shutil.copyfile(p, dest / p.name)

    weight_map: dict[str, str] = {}
    total = 0
    written = []
    for k, file in enumerate(files):
        state = load_pickle_shard(model_dir / file)
        name = _out_name(k, len(files))
        tensors = {}
        for tname, t in state.items():
            safetensors_dtype(t)  # refuse a dtype safetensors cannot store, by name
            # A fresh contiguous copy: no storage is shared between names (tied
            # weights), none is a view into a larger one.
            tensors[tname] = t.detach().contiguous().clone()
            total += t.numel() * t.element_size()
            if tname in weight_map:
                raise CheckpointError(
                    f"{model_dir / file}: tensor {tname!r} is also in another shard; "
                    "the shards overlap, re-download the checkpoint"
                )
            weight_map[tname] = name
        del state
        save_file(tensors, str(dest / name), metadata={"format": "pt"})
        del tensors
        written.append(name)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written
