"""What a command left behind: hashes, JSON, a restore round trip, refusals and leftovers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from compiler.checkpoint import tensor_index


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


def apply_and_restore(plan: Path, model: Path, tmp_path: Path) -> Path:
    """Apply `plan`, restore everything, and assert the files came back byte for byte;
    return the output directory."""
    import filecmp

    from executor.apply import apply_plan
    from executor.restore import restore

    out = tmp_path / "out"
    apply_plan(plan, out)
    back = tmp_path / "back"
    restore(out, "all", back)
    for f in ("model.safetensors", "config.json"):
        assert filecmp.cmp(model / f, back / f, shallow=False), f
    return out


def flip_data_byte(path: Path) -> None:
    """Flip one byte of tensor data (the last byte of the file is always data)."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def refused(args: list[str], capsys: pytest.CaptureFixture[str], *texts: str) -> str:
    """`plancc ARGS` exits 2 with every one of `texts` in its message and no traceback;
    return the message."""
    from executor.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    for t in texts:
        assert t in err, err
    assert "Traceback" not in err
    return err


def nothing_beside(path: Path) -> None:
    """`path` does not exist, and no temporary file of a write to it is left beside it."""
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
