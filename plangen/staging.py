"""How `plangen` writes its files: temporary names, atomic renames, cleanup after a kill.

`analyze` and `reconstruct` each write two files that belong together (a plan
and its sidecar, which the plan pins by sha256). Each is written to
`.NAME.tmp-PID` beside its destination and renamed into place; the two
renames run with SIGINT blocked, so Ctrl-C leaves either both old files or
both new ones. A run killed with `kill -9` cannot remove its temporary files,
so the next run to the same destination removes those whose process is gone
(`remove_stale`): only names of exactly this form, never anything else.
`committed` records what this process has put in place, so the Ctrl-C
message can say truthfully whether anything was written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

# Tags of plangen's temporary names: `.NAME.TAG-PID`. `old` is reconstruct's
# backup of the sidecar it replaces (put back if the new one never arrived).
TAGS = ("tmp", "old")

committed: list[Path] = []  # files this process renamed into place, in order


def temp_path(dest: Path, tag: str = "tmp") -> Path:
    """This process's temporary name for `dest`: `.NAME.TAG-PID` beside it."""
    assert tag in TAGS, tag
    return dest.with_name(f".{dest.name}.{tag}-{os.getpid()}")


def probe(dest: Path) -> None:
    """Create and remove this process's temporary file beside `dest`: raises the
    OSError a write would meet (read-only, /proc, no permission) before any work."""
    tmp = temp_path(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # left by an earlier run with this pid: ours to remove
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    tmp.unlink()


def make_parents(dest: Path) -> list[Path]:
    """Create `dest`'s missing parent directories; return them, deepest first, so a
    failed run can remove what it created (`remove_empty`)."""
    created = []
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    for d in reversed(created):
        d.mkdir()
    return created


def remove_empty(directories: list[Path]) -> None:
    """Remove the directories `make_parents` created, where nothing else was put."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return


def _owner(dest: Path, candidate: Path) -> tuple[str, int] | None:
    """(tag, pid) when `candidate` is one of plangen's temporary names for `dest`."""
    prefix = f".{dest.name}."
    if not candidate.name.startswith(prefix):
        return None
    tag, _, pid = candidate.name[len(prefix) :].partition("-")
    if tag not in TAGS or not pid.isdigit() or pid != str(int(pid)):
        return None
    return tag, int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(dest: Path) -> list[Path]:
    """Remove the temporary files of dead earlier runs to `dest`; return what was removed.

    A stale `old` backup whose destination is missing is the only copy of the
    previous file (the run died between its two renames): it is put back.
    """
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.iterdir()):
        owner = _owner(dest, p)
        if owner is None or not p.is_file() or p.is_symlink() or _alive(owner[1]):
            continue
        try:
            if owner[0] == "old" and not dest.exists():
                os.replace(p, dest)
                continue
            p.unlink()
            removed.append(p)
        except OSError:
            pass  # left for the next run; it is in nobody's way
    return removed


def remove_stale_caches(directory: Path) -> list[Path]:
    """Remove the layer walk's state-cache directories under `directory` left by runs
    that are gone (killed with SIGKILL: `executor.layerwise.CACHE_PREFIX` + their pid);
    a live run's, and anything not named so, are left alone."""
    import shutil

    from executor.layerwise import CACHE_PREFIX

    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        pid, dash, _ = p.name.removeprefix(CACHE_PREFIX).partition("-")
        named = p.name.startswith(CACHE_PREFIX) and dash and pid.isdigit()
        if not named or not p.is_dir() or p.is_symlink() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the few renames that must happen together;
    it is delivered, as KeyboardInterrupt, as soon as they are done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary file into place and remember that it was written."""
    os.replace(tmp, dest)
    committed.append(dest)
