"""sha256 of every file an output holds: recorded by apply, verified before restore.

`apply` records in `A/manifest.json` (`files`) the sha256 of every file it
writes under OUT (A's shards, config and side files, every bundle file,
`width_meta.json`, the other metadata), except the manifest itself and the
marker. Large files are hashed on a background thread as soon as each is
written, while the next one is written, so hashing mostly overlaps the copy.
`restore` and `plancc verify` hash them again and refuse any difference,
naming the file: a flipped byte in a bundle can no longer come back as "the
original checkpoint".
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from compiler.hashing import BLOCK, sha256_file
from executor.layout import MANIFEST, MARKER


class _Cancelled(Exception):
    pass


class Hasher:
    """Hash files on a background thread; `result()` waits for all of them.

    `add` hashes a finished file. `follow` hashes a file while it is being
    written, reading behind the writer (data below the file's size is already
    in the page cache, so it costs no disk read): the hash of a multi-GB shard
    is ready moments after its last byte instead of one more pass later.
    The writer calls the returned function once the file is complete.
    """

    def __init__(self, root: Path, workers: int = 1) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures: dict[str, Future[str]] = {}
        self._stop = threading.Event()

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def add(self, path: Path) -> None:
        self._futures[self._rel(path)] = self._pool.submit(sha256_file, path)

    def follow(self, path: Path) -> Callable[[], None]:
        finished = threading.Event()
        self._futures[self._rel(path)] = self._pool.submit(self._tail, path, finished)
        return finished.set

    def _tail(self, path: Path, finished: threading.Event) -> str:
        while not path.exists():  # the writer has not created it yet
            if self._stop.wait(0.001):
                raise _Cancelled(path)
        h = hashlib.sha256()
        pos = 0
        with path.open("rb", buffering=0) as fh:
            while True:
                done = finished.is_set()  # read before the data: nothing is missed
                block = os.pread(fh.fileno(), BLOCK, pos)
                if block:
                    h.update(block)
                    pos += len(block)
                elif done:
                    return h.hexdigest()
                elif self._stop.wait(0.002):
                    raise _Cancelled(path)

    def result(self) -> dict[str, str]:
        try:
            return {rel: f.result() for rel, f in sorted(self._futures.items())}
        finally:
            self._pool.shutdown()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(cancel_futures=True)


def output_files(root: Path) -> list[Path]:
    """Every file under an output root that `files` records (not the manifest or marker)."""
    skip = {Path("A") / MANIFEST, Path(MARKER)}
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root) not in skip]


def hash_all(root: Path, paths: Iterable[Path], workers: int = 2) -> dict[str, str]:
    hasher = Hasher(root, workers)
    for p in paths:
        hasher.add(p)
    return hasher.result()


def verify_files(root: Path, recorded: Mapping[str, str], which: Iterable[str]) -> list[str]:
    """Problems (missing file, different sha256) among the recorded files `which`."""
    problems = []
    present = []
    for rel in sorted(which):
        if not (root / rel).is_file():
            problems.append(f"{root / rel}: missing")
        else:
            present.append(root / rel)
    for rel, digest in hash_all(root, present).items():
        if digest != recorded[rel]:
            problems.append(
                f"{root / rel}: sha256 {digest[:16]}… differs from the {recorded[rel][:16]}… "
                "apply recorded (the file was changed or damaged)"
            )
    return sorted(problems)
