"""`plancc export`: write an existing result (an apply output's A, or a restore
result) in another format, into a new directory.

The source is only read. The destination is written like every plancc
output: checked first (an existing directory that is not plancc's is
refused), staged beside it, renamed into place when complete, marked (the
marker records the format and the source), locked against a second writer.
A model the format cannot express is refused before anything is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from compiler.checkpoint import CONFIG_NAME, CheckpointError


class ExportError(Exception):
    """The source or the request is wrong; nothing was written."""


@dataclass(frozen=True)
class ExportResult:
    dest: Path
    model_format: str
    seconds: float


def model_dir(src: Path) -> Path:
    """The model directory of `src`: OUT/A for an apply output, else `src` itself."""
    if (src / "A" / CONFIG_NAME).is_file():
        return src / "A"
    if (src / CONFIG_NAME).is_file():
        return src
    raise ExportError(
        f"{src}: no config.json (nor A/config.json); pass the -o directory of `plancc apply` "
        "or a model directory it wrote"
    )


def export(
    src: Path,
    dest: Path,
    model_format: str,
    force: bool = False,
    dtype: str = "f16",
    tokenizer_pre: str | None = None,
) -> ExportResult:
    """Write the model of `src` to `dest` in `model_format` (nemotron-nas or gguf)."""
    from compiler.checkpoint import architecture_of, read_config, tensor_index
    from executor.family_config import model_config
    from executor.formats import GGUF_FILE, gguf_writer
    from executor.formats import nemotron_nas as nas
    from executor.outdir import staged_output, write_marker

    start = time.perf_counter()
    a_dir = model_dir(src)
    try:
        raw = read_config(a_dir)
        config = model_config(raw)
        arch = architecture_of(config, str(a_dir / CONFIG_NAME))
        index = tensor_index(a_dir)
    except (CheckpointError, nas.LayoutError) as exc:
        raise ExportError(str(exc)) from None
    if model_format == nas.LAYOUT:
        if not nas.is_decilm(raw):
            problem = nas.nemotron_nas_problem(arch, config, nas.shapes_of(arch, config, index))
            if problem is not None:
                raise ExportError(f"{a_dir}: --format {nas.LAYOUT}: {problem}; nothing was written")
    elif model_format == "gguf":
        try:
            write = gguf_writer()
        except ImportError as exc:
            raise ExportError(f"--format gguf: {exc}; nothing was written") from None
    else:
        raise ExportError(f"--format {model_format}: export writes nemotron-nas or gguf")
    with staged_output(dest, "export", force, [src, a_dir]) as tmp:
        if model_format == nas.LAYOUT:
            nas.write_nemotron_nas(a_dir, tmp)
        else:
            try:
                write(a_dir, tmp / GGUF_FILE, dtype, tokenizer_pre=tokenizer_pre)
            except ValueError as exc:
                raise ExportError(f"--format gguf: {exc}; nothing was written") from None
        write_marker(tmp, "export", model_format=model_format, source=str(a_dir.resolve()))
    return ExportResult(dest, model_format, time.perf_counter() - start)
