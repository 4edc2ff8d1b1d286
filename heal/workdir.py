"""HEALED.work: the one directory `plancc heal` keeps between runs, and only if it is its own.

Finished stages and resumable training state wait in `HEALED.work/` until the
run installs HEALED/. Because a run deletes and rewrites what is in there, it
must never be a directory someone else made, nor the input, nor a run's that is
still alive:

- it is plancc's only when it carries the plancc marker with kind `heal-work`
  (`executor.outdir.write_marker`, which records the run's pid and start);
- a run holds an exclusive `flock` on it for as long as it lives, so a second
  `plancc heal -o SAME` is refused with the first run's pid and start (the
  kernel drops a dead process's lock, so a killed run's directory is free);
- an existing directory without the marker (a user's), a file, a symbolic
  link, the input itself, a directory inside the input or one holding it are
  refused before anything is deleted;
- without `--resume`, a marked directory nobody holds is a dead run's state:
  it is removed (saying so) and the run starts over; with `--resume` it is
  continued, and it must carry the marker;
- at the end the run removes it only if it is still the very directory it
  locked (same inode, its own pid in the marker): a directory put there by
  someone else meanwhile is left alone.

A directory that holds nothing but the marker when the run fails (refused
input, bad data) is removed again, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.cli import describe_os_error
from executor.layout import MARKER
from executor.outdir import absolute, overlap, read_marker, try_lock, write_marker
from heal.options import HealError

WORK_KIND = "heal-work"


def work_dir(dest: Path) -> Path:
    """Where a run to `dest` keeps its finished stages and training state."""
    return dest.with_name(dest.name + ".work")


def _who(marker: dict[str, Any] | None) -> str:
    """'pid N, started T' from a marker, for messages naming a run."""
    if not marker:
        return "pid unknown"
    return f"pid {marker.get('pid', '?')}, started {marker.get('created', '?')}"


def refuse_overlap(work: Path, inputs: Iterable[Path]) -> None:
    """Refuse a work directory that is the current directory, an input, lies inside
    one or holds one (`executor.outdir.overlap`, the test -o gets)."""
    clash = overlap(work, inputs)
    if clash is None:
        return
    how, inp = clash
    if how == "cwd":
        raise HealError(
            f"{work} (heal's work directory for this -o) is the current directory or "
            "contains it; choose another -o"
        )
    if how == "holds":
        raise HealError(
            f"{work} is where heal keeps its work for this -o, and it holds the input "
            f"({inp}); nothing was touched; choose another -o"
        )
    raise HealError(
        f"{work} (heal's work directory for this -o) would lie inside the input "
        f"({inp}); nothing was touched; choose an -o outside it"
    )


@dataclass
class HeldWorkDir:
    """A work directory this run has marked and holds the lock of."""

    path: Path
    fd: int

    def still_ours(self) -> bool:
        """The path still names the directory we locked, and its marker names this run."""
        try:
            now, held = os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)
        except OSError:
            return False
        marker = read_marker(self.path)
        return (
            (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
            and marker is not None
            and marker.get("kind") == WORK_KIND
            and marker.get("pid") == os.getpid()
        )

    def holds_nothing(self) -> bool:
        """Only the marker is in it: nothing a later run could resume from."""
        try:
            return [p.name for p in self.path.iterdir()] in ([], [MARKER])
        except OSError:
            return False


def _refuse_foreign(work: Path, fd: int, resume: bool) -> dict[str, Any]:
    """The marker of an existing, locked `work`; HealError (lock dropped) if it is not heal's."""
    marker = read_marker(work)
    if marker is None or marker.get("kind") != WORK_KIND:
        os.close(fd)
        what = f"it is a {marker['kind']} output" if marker else f"it has no {MARKER}"
        flag = "--resume continues only a heal work directory" if resume else "nothing was touched"
        raise HealError(
            f"{work} exists and is not a plancc heal work directory ({what}); {flag}; "
            "move it away or choose another -o"
        )
    return marker


def _examine(work: Path, resume: bool) -> tuple[int, dict[str, Any]] | None:
    """None when `work` does not exist; else its lock (held now) and marker. HealError
    for anything that is not a heal work directory nobody else holds."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise HealError(
            f"{work} exists and is not a directory plancc made (a file or a symbolic "
            "link); nothing was touched; move it away or choose another -o"
        )
    if not work.exists():
        return None
    try:
        fd = try_lock(work)
    except FileNotFoundError:  # removed since the look above
        return None
    if fd is None:
        raise HealError(
            f"{work} is in use by another plancc heal run ({_who(read_marker(work))}); "
            "wait for it to finish, or choose another -o"
        )
    return fd, _refuse_foreign(work, fd, resume)


def check_work_dir(work: Path, inputs: Iterable[Path], resume: bool) -> None:
    """Every refusal `held_work_dir` would make, changing nothing: run before the
    expensive checks, while a dead run's state is still there to be kept if they fail."""
    work = absolute(work)
    refuse_overlap(work, inputs)
    try:
        found = _examine(work, resume)
    except OSError as exc:
        raise HealError(describe_os_error("cannot use the work directory", exc, work)) from None
    if found is not None:
        os.close(found[0])


def _claim(work: Path, resume: bool, note: Callable[[str], None]) -> HeldWorkDir:
    """Create or take over `work` under its lock; HealError when it is not ours to use."""
    for _ in range(3):  # the directory may vanish or appear between two looks
        found = _examine(work, resume)
        if found is None:
            if resume:
                note(f"--resume: {work} does not exist; starting from the beginning")
            try:
                os.mkdir(work)
            except FileExistsError:
                continue
            fd = try_lock(work)
            if fd is None:  # another run created it in between
                raise HealError(f"{work} is being used by another plancc heal; choose another -o")
            write_marker(work, WORK_KIND)
            return HeldWorkDir(work, fd)
        fd, marker = found
        if resume:
            write_marker(work, WORK_KIND)  # this run's pid and start, for a second writer
            return HeldWorkDir(work, fd)
        note(
            f"removing {work}: the state of an earlier run ({_who(marker)}) that did not "
            "finish; pass --resume to continue such a run instead"
        )
        try:
            _discard(work)
        finally:
            os.close(fd)
    raise HealError(f"{work} kept changing while it was checked; try again")


@contextlib.contextmanager
def held_work_dir(
    work: Path, inputs: Iterable[Path], resume: bool, note: Callable[[str], None]
) -> Iterator[HeldWorkDir]:
    """Claim `work` for this run (see the module docstring); release its lock on exit.

    A failure that leaves nothing but the marker removes the directory again;
    any other failure (Ctrl-C included) leaves it marked and unlocked, so
    `--resume` continues it.
    """
    work = absolute(work)
    refuse_overlap(work, inputs)
    try:
        held = _claim(work, resume, note)
    except OSError as exc:
        raise HealError(describe_os_error("cannot use the work directory", exc, work)) from None
    try:
        yield held
    except BaseException:
        if held.holds_nothing() and held.still_ours():
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        os.close(held.fd)


def _discard(work: Path) -> None:
    """Remove a work directory of ours: first renamed out of the way to
    `.HEALED.old-XXXXXXXX` (marked), so a removal cut short by Ctrl-C never leaves a
    half-deleted HEALED.work that blocks the next run; `executor.outdir.remove_stale`
    finishes such a leftover on the next run to HEALED."""
    dest = work.name[: -len(".work")] if work.name.endswith(".work") else work.name
    trash = work.parent / f".{dest}.old-{secrets.token_hex(4)}"
    os.rename(work, trash)
    shutil.rmtree(trash, ignore_errors=True)


def finish(held: HeldWorkDir, note: Callable[[str], None]) -> None:
    """Remove the work directory after a successful install, if it is still ours."""
    if held.still_ours():
        _discard(held.path)
    else:
        note(
            f"left {held.path} alone: during the run it was replaced by a directory "
            "plancc did not create"
        )


def original_model(root: Path, work: Path) -> Path:
    """The original model, rebuilt from A and every bundle (the teacher, the report's
    first row), once per run."""
    from executor.restore import restore

    where = work / "original"
    if not (where / "config.json").is_file():
        restore(root, "all", where, force=True)
    return where
