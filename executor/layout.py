"""The layout of an apply output directory, and validated reads of its metadata.

One place names every file `plancc apply` writes and `restore`, `verify` and
`executor.load` read (the contract is described in `executor.apply`), and
checks each metadata file's structure when it is read: a hand-edited or
garbled `width_meta.json` is an error that names the file, the key and the
fix, never an AttributeError deep inside restore.

Validation is by small declarative schemas (`conform`): a type, a tuple of
alternatives, `{key: schema}` for an object with those keys (a key ending in
`?` is optional; other keys are allowed), `[schema]` for a list of items and
`MapOf(schema)` for an object whose every value fits. Paths stored in the
metadata must stay inside the output directory (`relative_path`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = 1
WIDTH_BUNDLE = "_width"  # bundle holding the sliced-away channels of kept layers
MANIFEST = "manifest.json"
PRUNE_LOG = "prune_log.json"
LAYERS_MAP = "layers_map.json"
BUNDLE_META = "bundle_meta.json"
WIDTH_META = "width_meta.json"
ORIGINAL_CONFIG_DIR = "original_config"
ORIGINAL_HEADERS = "safetensors_headers.json"
# Remote-code files (`*.py`) of the source, relative to OUT: kept out of A
# unless asked for (`--copy-remote-code`); restore --upto all puts them back.
WITHHELD_DIR = "bundles/_files"
# Written into every output root plancc creates (apply's OUT, restore's DEST,
# and their temporary directories): what `--force` may replace and what a
# later run may clean up after a crash.
MARKER = ".plancc-output.json"

DAMAGED = "the apply output is damaged or was edited: run `plancc apply` again to rebuild it"


class MetadataError(Exception):
    """A metadata file of an output directory is missing, unreadable or malformed."""


@dataclass(frozen=True)
class MapOf:
    """Schema: a JSON object whose every value fits `value`."""

    value: Any


def _kind(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_kind(s) for s in schema)
    if isinstance(schema, dict | MapOf):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    return {
        int: "an integer",
        str: "a string",
        bool: "true or false",
        float: "a number",
        type(None): "null",
    }.get(schema, str(schema))


def _fits_type(value: Any, schema: type) -> bool:
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if schema is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, schema)


def conform(value: Any, schema: Any, where: str = "") -> None:
    """Raise ValueError naming the first place (`a.b[3]`) where `value` does not fit."""
    if isinstance(schema, tuple):
        for alt in schema:
            try:
                conform(value, alt, where)
                return
            except ValueError:
                continue
        raise ValueError(f"`{where or '(top)'}` should be {_kind(schema)}")
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ValueError(f"`{where or '(top)'}` should be an object")
        for key, sub in schema.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise ValueError(f"`{_join(where, name)}` is missing")
            conform(value[name], sub, _join(where, name))
        return
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise ValueError(f"`{where or '(top)'}` should be an object")
        for key, sub in value.items():
            conform(sub, schema.value, _join(where, key))
        return
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise ValueError(f"`{where or '(top)'}` should be a list")
        for i, item in enumerate(value):
            conform(item, schema[0], f"{where}[{i}]")
        return
    if not _fits_type(value, schema):
        raise ValueError(f"`{where or '(top)'}` should be {_kind(schema)}, found {value!r:.60}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def relative_path(text: str, where: str) -> str:
    """A path stored in metadata: relative, inside the output, no `..`."""
    p = PurePosixPath(text)
    if not text or p.is_absolute() or ".." in p.parts or "\\" in text:
        raise ValueError(f"`{where}` is {text!r}, not a path inside the output directory")
    return text


# ---- the schemas of the metadata files ------------------------------------------------

_LAYER_SHAPE = {
    "original": int,
    "heads": int,
    "kv_heads": int,
    "ffn?": (int, type(None)),
    "added_biases?": [str],
}
MANIFEST_SCHEMA = {
    "format": int,
    "plan": {"file": str, "sha256": str},
    "source": {"fingerprint": str, "arch": str, "files": [str]},
    "params": {"before": int, "after": int},
    "removed": {
        "layers": [int],
        "bundles": MapOf({"layers": [int], "params": int, "tensors": int}),
        "width": {"params": int, "tensors": int, "dir": (str, type(None))},
    },
    "added": [{"layer": int, "name": str, "file": str, "shape": [int]}],
    "layers": [_LAYER_SHAPE],
    "copied_files": [str],
    "withheld_files?": [str],
    "remote_code?": bool,
    "files": MapOf(str),
}
_PLACE = {"file": str, "name": str, "shape": [int]}
PRUNE_LOG_SCHEMA = {
    "tensors": [
        {
            "source": str,
            "shape": [int],
            "dtype": str,
            "action": str,
            "output?": _PLACE,
            "bundle?": str,
            "bundle_file?": str,
            "removed?": {
                "file": str,
                "shape": [int],
                "whole": bool,
                "axis?": int,
                "selection?": str,
            },
        }
    ]
}
LAYERS_MAP_SCHEMA = {"new_to_original": [int], "original_layers": int}
BUNDLE_META_SCHEMA = {
    "bundle": str,
    "layers": [int],
    "files": MapOf(str),
    "source_fingerprint": str,
    "params": int,
    "tensors": int,
}
WIDTH_META_SCHEMA = {
    "bundle": str,
    "source_fingerprint": str,
    "layers": MapOf(dict),
    "selections": MapOf([int]),
}
HEADERS_SCHEMA = MapOf(str)
_ACTIONS = {
    "copied": ("output",),
    "bundled": ("bundle", "bundle_file"),
    "sliced": ("output", "removed"),
    "modified": ("output", "removed"),
    "removed": ("removed",),  # a dropped expert's tensor: whole in _width, not in A
}


def read_json(path: Path, fix: str = DAMAGED) -> Any:
    """A JSON file of an output directory (MetadataError when missing or not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetadataError(
            f"{path}: missing; is this the output of `plancc apply`? ({fix})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path}: cannot read it ({exc}); {fix}") from None


def read_metadata(path: Path, schema: Any, fix: str = DAMAGED) -> Any:
    """Read a metadata file and check it against its schema."""
    data = read_json(path, fix)
    try:
        conform(data, schema)
        if schema is PRUNE_LOG_SCHEMA:
            _check_prune_log(data)
        elif schema is MANIFEST_SCHEMA:
            for i, name in enumerate(data["copied_files"] + data.get("withheld_files", [])):
                relative_path(name, f"copied_files[{i}]")
            for name in data.get("files", {}):
                relative_path(name, f"files.{name}")
        elif schema is BUNDLE_META_SCHEMA:
            for key, name in data["files"].items():
                relative_path(name, f"files.{key}")
    except ValueError as exc:
        raise MetadataError(f"{path}: malformed: {exc}; {fix}") from None
    return data


def _check_prune_log(data: Any) -> None:
    for i, entry in enumerate(data["tensors"]):
        where = f"tensors[{i}]"
        need = _ACTIONS.get(entry["action"])
        if need is None:
            raise ValueError(f"`{where}.action` is {entry['action']!r}")
        for key in need:
            if key not in entry:
                raise ValueError(f"`{where}.{key}` is missing for action {entry['action']!r}")
        if "bundle_file" in entry:
            relative_path(entry["bundle_file"], f"{where}.bundle_file")
        if "removed" in entry:
            removed = entry["removed"]
            relative_path(removed["file"], f"{where}.removed.file")
            if not removed["whole"] and ("axis" not in removed or "selection" not in removed):
                raise ValueError(f"`{where}.removed` needs `axis` and `selection`")


# ---- the JSON files an output holds ------------------------------------------------

# An indented JSON array of scalars. It starts with `[` and a newline, which
# no JSON string can contain, so it never matches inside a string value.
_SCALAR = r'(?:-?[0-9][0-9.eE+-]*|true|false|null|"[^"\\\[\]\n]*")'
_SCALAR_LIST = re.compile(rf"\[\n *{_SCALAR}(?:,\n *{_SCALAR})*\n *\]")


def dumps(data: Any) -> str:
    """Indented JSON with lists of scalars on one line (layer lists stay readable).

    Each collapsed list is parsed back and re-dumped, so values never change.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return _SCALAR_LIST.sub(lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False), text)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data) + "\n", encoding="utf-8")
