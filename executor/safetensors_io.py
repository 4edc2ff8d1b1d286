"""Safetensors at the byte level: lazy reads, range copies, streaming writes.

The executor never loads a checkpoint: a tensor the plan leaves alone is moved
as a byte range from the source file to the output file (`copy_file_range`,
in the kernel, reflinked on filesystems that can), and a tensor the plan
slices is read alone, sliced as raw bytes (the element type is never decoded,
so every dtype slices bit-exactly) and written. Because every output shape is
known before any data moves, each file's header is written first and the data
streamed after it, one tensor at a time: peak memory is about one tensor.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON (padded with spaces to a multiple of 8)
mapping each tensor name to {dtype, shape, data_offsets}, then the data
section, tensors back to back with no gaps.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from compiler.checkpoint import DTYPE_BITS, TensorInfo

# The metadata transformers expects (it refuses files whose `format` is unknown).
DEFAULT_METADATA = {"format": "pt"}
COPY_CHUNK = 1 << 30  # bytes per copy_file_range/sendfile call
READ_CHUNK = 1 << 24  # bytes per read in the buffered fallback


class TensorIOError(Exception):
    """A tensor cannot be read or written (truncated source, unsupported dtype)."""


def itemsize(dtype: str) -> int:
    """Bytes per element; sub-byte dtypes (F4, F6) cannot be sliced per element."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None or bits % 8:
        raise TensorIOError(f"dtype {dtype} has no whole-byte element size; it cannot be sliced")
    return bits // 8


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise TensorIOError(f"unknown safetensors dtype {dtype}")
    return (n * bits + 7) // 8


# ---- reading ----------------------------------------------------------------------


class SourceFiles:
    """Open source files by path, and reusable byte buffers, for one run.

    Buffers are the executor's only large allocations: one per slot, grown to
    the largest tensor that slot has held and reused for every later tensor,
    so memory stays at a few tensors however many are processed (allocating
    and freeing a tensor-sized buffer per tensor lets the heap fragment and
    peak RSS drift far above that). A slot's contents are valid until the
    next use of the same slot.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._buffers: dict[str, bytearray] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise source_read_error(str(path), exc) from None
            self._fds[path] = fd
        return fd

    def buffer(self, slot: str, size: int) -> memoryview:
        """`size` writable bytes of the slot's buffer (grown when too small)."""
        buf = self._buffers.get(slot)
        if buf is None or len(buf) < size:
            self._buffers.pop(slot, None)
            del buf
            buf = bytearray(size)
            self._buffers[slot] = buf
        return memoryview(buf)[:size]

    def array(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 array of `shape` over the slot's buffer."""
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.buffer(slot, n), dtype=np.uint8, count=n).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_range(fd: int, begin: int, end: int, where: str, into: memoryview) -> None:
    """Read bytes [begin, end) of an open file into `into`; a short read means truncation."""
    assert into.nbytes == end - begin
    done = 0
    while done < into.nbytes:
        try:
            n = os.preadv(fd, [into[done:]], begin + done)
        except OSError as exc:
            raise source_read_error(where, exc) from None
        if n == 0:
            raise TensorIOError(
                f"{where}: the file ends {into.nbytes - done} bytes early (truncated?); "
                "re-download or re-save the checkpoint"
            )
        done += n


def read_raw(files: SourceFiles, path: Path, info: TensorInfo, slot: str = "read") -> np.ndarray:
    """A tensor's bytes as a uint8 array shaped (*shape, itemsize): sliceable, never decoded.

    The array lives in buffer `slot` of `files`: valid until that slot's next use.
    """
    begin, end = info.byte_range
    raw = files.array(slot, (*info.shape, itemsize(info.dtype)))
    view = memoryview(raw.reshape(-1)).cast("B") if raw.size else memoryview(b"")
    if raw.size:
        read_range(files.fd(path), begin, end, f"{path}: tensor {info.name!r}", view)
    return raw


_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def decode(raw: np.ndarray, dtype: str) -> Any:
    """Raw bytes (as from `read_raw`) viewed as a torch tensor of the stored dtype.

    Zero-copy when `raw` is contiguous (it shares the read buffer). Only
    metrics decode (to score channels); slicing and copying never do.
    """
    import torch

    name = _TORCH_DTYPES.get(dtype)
    if name is None:
        raise TensorIOError(f"dtype {dtype} cannot be decoded to compute a metric")
    shape = raw.shape[:-1]
    flat = np.ascontiguousarray(raw).reshape(-1)
    if not flat.flags.writeable:  # torch wants a writable buffer; copy once
        flat = flat.copy()
    return torch.from_numpy(flat).view(getattr(torch, name)).reshape(shape)


def encode(tensor: Any, dtype: str) -> bytes:
    """A torch tensor to the little-endian bytes of safetensors dtype `dtype`."""
    import torch

    t = tensor.detach().to("cpu", getattr(torch, _TORCH_DTYPES[dtype])).contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


# ---- copying ----------------------------------------------------------------------


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, where: str) -> None:
    """Append bytes [offset, offset+count) of src to dst (at dst's current position).

    `copy_file_range` keeps the data in the kernel (and may share blocks on
    CoW filesystems); where it is unavailable (another filesystem, an old
    kernel) `sendfile`, then plain reads and writes, do the same job.
    """
    done = 0
    mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    while done < count:
        want = min(count - done, COPY_CHUNK)
        try:
            if mode == "copy_file_range":
                n = os.copy_file_range(src_fd, dst_fd, want, offset + done)
            elif mode == "sendfile":
                n = os.sendfile(dst_fd, src_fd, offset + done, want)
            else:
                chunk = _pread(src_fd, min(want, READ_CHUNK), offset + done, where)
                n = len(chunk)
                _write_all(dst_fd, chunk)
        except OSError as exc:
            if mode == "buffered":
                raise
            unsupported = exc.errno in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EOPNOTSUPP,
                errno.EINVAL,
                errno.EPERM,
                errno.EBADF,
            )
            # Another error (EIO, ENOSPC, ...) may be the source's or the output's; the
            # kernel does not say which. Plain reads and writes find out.
            mode = "sendfile" if mode == "copy_file_range" and unsupported else "buffered"
            continue
        if n == 0:
            raise TensorIOError(
                f"{where}: the source ends {count - done} bytes early (truncated?); "
                "re-download or re-save the checkpoint"
            )
        done += n


def _pread(fd: int, size: int, offset: int, where: str) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise source_read_error(where, exc) from None


def source_read_error(where: str, exc: OSError) -> TensorIOError:
    """A failed read of an input file: said as a read, never as a failure to write."""
    return TensorIOError(
        f"{where}: cannot read it: {exc.strerror or exc}; the file or its disk is damaged "
        "or was removed: check it, re-download or re-save the checkpoint, then run again "
        "(nothing was written)"
    )


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


# ---- writing ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output file: its header fields and how to produce its bytes.

    `copy` = (source path, begin, end) moves bytes unchanged; otherwise
    `produce()` returns the bytes (a slice, a merge, a computed bias).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    copy: tuple[Path, int, int] | None = None
    produce: Callable[[], bytes | bytearray | memoryview | np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def header_bytes(entries: Iterable[OutEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed, space-padded header for entries laid out in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: Path,
    entries: list[OutEntry],
    files: SourceFiles,
    metadata: Mapping[str, str] | None = DEFAULT_METADATA,
    header: bytes | None = None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write one safetensors file: header first, then each tensor's data in order.

    `header` (length prefix included) replaces the generated one: restore uses
    it to rebuild an original file byte for byte; entries must then be in the
    header's data order and fill the data section exactly.
    """
    head = header if header is not None else header_bytes(entries, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_entries(fd, head, entries, files, progress)
    except OSError as exc:
        if exc.filename is None:  # a write on the fd: say which file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        os.close(fd)


def _write_entries(
    fd: int,
    head: bytes,
    entries: list[OutEntry],
    files: SourceFiles,
    progress: Callable[[int], object] | None,
) -> None:
    """The header, then each tensor's data in order, on an open output file."""
    _write_all(fd, head)
    for e in entries:
        if e.copy is not None:
            src, begin, end = e.copy
            assert end - begin == e.nbytes, (e.name, end - begin, e.nbytes)
            copy_range(files.fd(src), fd, begin, end - begin, f"{src}: tensor {e.name!r}")
        else:
            assert e.produce is not None, e.name
            data = e.produce()
            if isinstance(data, np.ndarray):
                data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
            size = memoryview(data).nbytes
            if size != e.nbytes:
                raise TensorIOError(
                    f"internal error: {e.name} produced {size} bytes, expected {e.nbytes}"
                )
            _write_all(fd, data)
            del data
        if progress is not None:
            progress(e.nbytes)


T = TypeVar("T")


def shard_names(count: int) -> list[str]:
    """Hub-style file names: `model.safetensors`, or `model-0000k-of-0000n.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def pack_by_size(items: list[T], size: Callable[[T], int], max_bytes: int) -> list[list[T]]:
    """Consecutive items in groups of at most `max_bytes` (one item may exceed it alone)."""
    groups: list[list[T]] = [[]]
    total = 0
    for item in items:
        n = size(item)
        if groups[-1] and total + n > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += n
    return groups


def order_for_alignment(entries: list[OutEntry]) -> list[OutEntry]:
    """Wider elements first (stable), as safetensors' own writer does, so that
    every tensor starts at a multiple of its element size."""
    return sorted(entries, key=lambda e: -(DTYPE_BITS.get(e.dtype, 8)))


def read_header_text(path: Path) -> str:
    """A safetensors file's header exactly as stored (JSON plus padding)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return fh.read(length).decode("utf-8")


def file_index(
    path: Path, label: str | None = None, fix: str | None = None
) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file (validated header, no data read).

    `label` is stored as each TensorInfo's `file` (default: the file's name);
    `fix` ends error messages (default: the checkpoint's, re-download it).
    """
    from compiler.checkpoint import CHECKPOINT_FIX, read_safetensors_header

    header = read_safetensors_header(path, fix or CHECKPOINT_FIX)
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = TensorInfo(
            name=name,
            shape=tuple(entry["shape"]),
            dtype=entry["dtype"],
            file=label or path.name,
            data_offsets=(begin, end),
            data_start=8 + length,
        )
    return out
