"""plancc's cache directory: `$PLANCC_CACHE`, else `~/.cache/plancc`.

Holds the converted demo model and small memoized facts (such as which
shapes a transformers config class accepts) so repeated commands stay fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "PLANCC_CACHE"


def default_cache_dir() -> Path:
    """`$PLANCC_CACHE` when set, else `~/.cache/plancc`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plancc"


def read_json(name: str) -> dict[str, Any]:
    """A cached JSON object, or {} when absent or unreadable (a cache never fails a command)."""
    try:
        data = json.loads((default_cache_dir() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(name: str, data: dict[str, Any]) -> None:
    """Replace a cached JSON object atomically; silently skip an unwritable cache."""
    directory = default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True, indent=1)
        os.replace(tmp, directory / name)
    except OSError:
        pass
