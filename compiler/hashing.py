"""sha256 of a file's bytes: the one digest plans, sidecars and outputs record."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 22  # bytes per read; hashlib releases the GIL for blocks this large


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at `path`, read in blocks (any size, constant memory)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
    return h.hexdigest()
