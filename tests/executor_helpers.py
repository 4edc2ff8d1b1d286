"""Helpers shared by the executor tests (apply, restore, equivalence)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from compiler.checkpoint import load_checkpoint_facts, tensor_index


def write_plan(tmp_path: Path, model_dir: Path, body: str, name: str = "plan.prn") -> Path:
    """A plan for `model_dir` (its real model block and fingerprint, `source` set) plus `body`."""
    ck = load_checkpoint_facts(model_dir)
    text = f'plan 1\n{ck.model_block()}source "{model_dir}"\n\n{body.strip()}\n'
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes, by name, read straight from the files.

    `path`: a checkpoint directory or one safetensors file.
    """
    from executor.safetensors_io import file_index

    index = file_index(path) if path.is_file() else tensor_index(path)
    base = path.parent if path.is_file() else path
    out = {}
    for name, info in index.items():
        begin, end = info.byte_range
        with (base / info.file).open("rb") as fh:
            fh.seek(begin)
            out[name] = hashlib.sha256(fh.read(end - begin)).hexdigest()
    return out


def file_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a directory (recursively), by relative path, except
    plancc's `.plancc-output.json` marker (what `--force` may replace)."""
    from executor.layout import MARKER

    return {
        str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.relative_to(model_dir) != Path(MARKER)
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def tokens(vocab: int = 128, length: int = 12, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, length), generator=g)


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def load_original(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
