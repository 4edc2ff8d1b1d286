"""Output directories: staged beside the destination, renamed into place, no user file lost.

Every command that writes a directory (`apply -o OUT`, `restore -o DEST`)
goes through `staged_output`:

- the destination is checked first: an existing one is replaced only with
  `--force` and only when it is a previous plancc output (it holds the
  `.plancc-output.json` marker, or an older apply output's `A/manifest.json`);
  the current directory, a directory holding the command's inputs, a file or
  a symbolic link are refused, so a typo never erases unrelated work;
- the output is written into `.NAME.tmp-XXXXXXXX` beside it, created with the
  mode a plain `mkdir` gives (the umask decides, not 0700), marked with the
  marker and locked with `flock` for as long as the run lives;
- the run holds a lock on the destination (`destination_lock`), so a second
  run writing the same `-o` is refused with a message naming the first;
- on success it is renamed into place with a rename that never replaces
  anything (`rename_noreplace`); the destination is checked again at that
  moment, so a directory that appeared meanwhile is never replaced unless it
  is a plancc output and `--force` was given (the old output is first moved
  into `.NAME.old-XXXXXXXX`, checked there, then removed); on any failure the
  staging directory is removed;
- a run killed with `kill -9` cannot clean up, so each new run to the same
  destination removes the staging directories beside it that carry the marker
  and whose lock nobody holds (their owner is dead; the kernel drops a dead
  process's locks).

OSErrors become `OutputError`s that name what failed, the path, the reason and
what to do (`describe_os_error`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from compiler.cli import describe_os_error
from executor.layout import FORMAT, MANIFEST, MARKER

STAGING_TAGS = ("tmp", "old", "pickle")


class OutputError(Exception):
    """The output location cannot be used or written; nothing was left behind."""


def absolute(path: Path) -> Path:
    """`path` made absolute without resolving symlinks (`.` gets its real name)."""
    return Path(os.path.abspath(path))


def is_plancc_output(path: Path) -> bool:
    """A directory plancc wrote: the marker, or an older apply output's manifest."""
    if (path / MARKER).is_file():
        return read_marker(path) is not None
    return (path / "A" / MANIFEST).is_file()


def overlap(path: Path, inputs: Iterable[Path]) -> tuple[str, Path | None] | None:
    """Why a directory a command would replace or delete must not be used, or None:
    ("cwd", None) it is the current directory or holds it; ("holds", INPUT) it is an
    input or holds one; ("is inside", INPUT) it lies inside an input. Symbolic links
    are followed both ways."""
    path = absolute(path)
    cwd = absolute(Path.cwd())
    if cwd == path or cwd.is_relative_to(path):
        return ("cwd", None)
    for inp in inputs:
        inp = absolute(inp)
        real = inp.resolve()
        for d in {path, path.resolve()}:
            if d in (inp, real) or inp.is_relative_to(d) or real.is_relative_to(d):
                return ("holds", inp)
            if d.is_relative_to(real):
                return ("is inside", inp)
    return None


def check_destination(dest: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse a destination that would overwrite or delete anything but a plancc output."""
    dest = absolute(dest)
    for parent in dest.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{dest}: {parent} is a file, not a directory; choose another -o")
    clash = overlap(dest, inputs)
    if clash == ("cwd", None):
        raise OutputError(
            f"{dest}: that is the current directory or contains it; choose a new directory for -o"
        )
    if clash is not None:
        how, inp = clash
        raise OutputError(f"{dest}: it {how} an input ({inp}); choose another -o")
    if not (dest.exists() or dest.is_symlink()):
        return
    if not force:
        raise OutputError(
            f"{dest} already exists; pass --force to replace it (only a previous plancc "
            "output is ever replaced)"
        )
    if dest.is_symlink():
        raise OutputError(f"{dest} is a symbolic link; remove it or choose another -o")
    if not dest.is_dir():
        raise OutputError(f"{dest} exists and is not a directory; remove it or choose another -o")
    if not is_plancc_output(dest):
        raise OutputError(
            f"{dest} exists and is not a plancc output (no {MARKER}), so --force will not "
            "delete it; remove it yourself or choose another -o"
        )


def try_lock(path: Path) -> int | None:
    """An exclusive flock on a directory, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_marker(root: Path, kind: str, **record: Any) -> None:
    """Mark `root` as plancc's; `record` adds fields (apply: the manifest's sha256)."""
    data = {"tool": "plancc", "kind": kind, "format": FORMAT, "pid": os.getpid()}
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (root / MARKER).write_text(json.dumps({**data, **record}) + "\n", encoding="utf-8")


def read_marker(root: Path) -> dict[str, Any] | None:
    """The plancc marker's record of directory `root`, or None when it has none
    (absent, unreadable, or not plancc's)."""
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "plancc" else None


@contextlib.contextmanager
def staging_dir(dest: Path, tag: str, kind: str) -> Iterator[Path]:
    """A locked, marked `.NAME.TAG-XXXXXXXX` beside `dest`, removed on failure.

    On success it is left for the caller (renamed into place, or removed).
    """
    assert tag in STAGING_TAGS, tag
    while True:
        path = dest.parent / f".{dest.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, like a plain mkdir
            break
        except FileExistsError:
            continue
    fd = try_lock(path)
    assert fd is not None, path  # just created, nobody else knows it
    try:
        write_marker(path, kind)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def remove_stale(dest: Path) -> list[Path]:
    """Remove the staging directories of earlier runs to `dest` whose process is gone
    (marked by plancc, and nobody holds their lock); return what was removed."""
    dest = absolute(dest)
    if not dest.parent.is_dir():
        return []
    prefix = f".{dest.name}."
    removed = []
    for p in sorted(dest.parent.iterdir()):
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        tag, _, token = p.name[len(prefix) :].partition("-")
        if tag not in STAGING_TAGS or len(token) != 8 or not (p / MARKER).is_file():
            continue
        fd = try_lock(p)
        if fd is None:  # a live run is writing it
            continue
        try:
            shutil.rmtree(p)
            removed.append(p)
        except OSError:
            pass  # left for the next run; it is not in anyone's way
        finally:
            os.close(fd)
    return removed


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError when `dst` exists.

    A plain rename(2) silently replaces an empty directory (and a file with a
    file), so a directory that appears at `dst` between a check and the rename
    would be lost; Linux's renameat2(RENAME_NOREPLACE) makes the check and the
    rename one step. Where it is unavailable (another kernel or filesystem),
    the check is made just before a plain rename.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 1) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _load_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_renameat2 = _load_renameat2()


def install(staged: Path, dest: Path, kind: str, force: bool) -> None:
    """Rename a complete staging directory into place.

    The destination is checked again here, at the last moment, because it may
    have appeared or changed since the run began: it is replaced only with
    `force` and only when it is a plancc output, and the old output is first
    moved aside and checked there (so nothing changes it between check and
    removal); anything else is put back untouched and the run fails.
    """
    try:
        rename_noreplace(staged, dest)
        return
    except FileExistsError:
        pass
    if not force:
        raise OutputError(
            f"{dest} appeared while this run was writing; it was left untouched and this "
            "run's output was discarded; pass --force to replace a plancc output, or choose "
            "another -o"
        )
    with staging_dir(dest, "old", kind) as old:
        aside = old / dest.name
        os.rename(dest, aside)  # `aside` is new inside a directory of ours
        if aside.is_symlink() or not aside.is_dir() or not is_plancc_output(aside):
            rename_noreplace(aside, dest)  # not ours: put it back as it was
            raise OutputError(
                f"{dest} was replaced while this run was writing by something that is not a "
                "plancc output; it was left untouched and this run's output was discarded; "
                "choose another -o"
            )
        try:
            rename_noreplace(staged, dest)
        except OSError:
            rename_noreplace(aside, dest)  # put the old output back
            raise
        shutil.rmtree(old, ignore_errors=True)


LOCK_SUFFIX = "lock"


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    """Who holds a destination lock, from the record its holder wrote."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {data['pid']}, `{data['command']}`, started {data['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


@contextlib.contextmanager
def destination_lock(dest: Path, kind: str) -> Iterator[None]:
    """Hold an exclusive lock on `dest` for one run: a second writer is refused.

    The lock is `flock` on `.NAME.lock` beside `dest`, which records the
    holder's pid, command and start time so the refusal can name it. The
    kernel releases it when its process dies, so a killed run never blocks
    the next one. The file is removed by its holder; an opener that finds it
    replaced after locking (the holder removed it meanwhile) tries again.
    """
    path = _lock_path(dest)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"{dest}: another plancc run is writing it ({_holder(path)}); wait for it "
                "to finish or choose another -o"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = {
            "tool": "plancc",
            "kind": kind,
            "pid": os.getpid(),
            "command": f"plancc {kind}",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def staged_output(
    dest: Path,
    kind: str,
    force: bool,
    inputs: Iterable[Path] = (),
    what: str = "cannot write the output",
) -> Iterator[Path]:
    """Check `dest`, clean up after dead runs, yield a staging directory, install it.

    Nothing is left behind on failure; OSErrors become OutputError.
    """
    dest = absolute(dest)
    check_destination(dest, force, inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with destination_lock(dest, kind):
            check_destination(dest, force, inputs)  # another run may have just finished
            remove_stale(dest)
            with staging_dir(dest, "tmp", kind) as tmp:
                yield tmp
                install(tmp, dest, kind, force)
    except OSError as exc:
        raise OutputError(describe_os_error(what, exc, dest)) from None
