"""Helpers of the mount reliability and security tests (import them into a test module).

- `log_files` logs a dict of exact bytes as a new version;
- `read_range` reads through a mount, optionally dropping the kernel's page cache for that range
  first, so that the read reaches the daemon (a version's files are opened with keep_cache, so
  without this most re-reads never leave the kernel);
- `Churner` is a thread that, with its own `Store`, logs new versions, deletes old ones (never a
  protected one) and runs `gc(grace_seconds=0)` in a loop, counting what it did;
- `tree_snapshot` records everything about a directory tree that a writer could change.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import log_files

from artifactfs import Store


def read_range(path: str | os.PathLike[str], off: int, n: int, *, uncached: bool, use_mmap: bool = False) -> bytes:
    """`n` bytes at `off` of a file through the mount (fewer at end of file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if uncached:
            # The page cache of a FUSE file honours DONTNEED: the next read goes to the daemon.
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        if use_mmap:
            size = os.fstat(fd).st_size
            if off >= size or n == 0:
                return b""
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                return bytes(mm[off:off + n])
        out = bytearray()
        while len(out) < n:
            b = os.pread(fd, n - len(out), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


@dataclass
class ChurnStats:
    logged: int = 0
    deleted: int = 0
    gc_runs: int = 0
    blobs_freed: int = 0
    errors: list[str] = field(default_factory=list)


class Churner(threading.Thread):
    """Log, delete and collect versions of `artifact` until stopped.

    Versions listed in `protect` (specs like "load:v0") are never deleted. Every new version
    holds some fresh random files (whose blobs gc frees once the version is deleted) and,
    when `shared` is given, some files identical to protected ones (their blobs must survive
    every gc, since a protected version still refers to them).
    """

    def __init__(self, store_root: str, artifact: str, *, protect: set[str], shared: dict[str, bytes] | None = None,
                 period: float = 1.0, keep: int = 2, seed: int = 7) -> None:
        super().__init__(name="churner", daemon=True)
        self.store_root = store_root
        self.artifact = artifact
        self.protect = protect
        self.shared = shared or {}
        self.period = period
        self.keep = keep
        self.rng = random.Random(seed)
        self.stats = ChurnStats()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        store = Store(self.store_root)
        try:
            mine: list[str] = []
            while not self._stop_event.is_set():
                files = {f"fresh/{i}.bin": self.rng.randbytes(self.rng.randint(1, 256 * 1024)) for i in range(4)}
                for k in self.rng.sample(sorted(self.shared), min(3, len(self.shared))):
                    files[f"shared/{k}"] = self.shared[k]
                v = log_files(store, self.artifact, files)
                self.stats.logged += 1
                spec = f"{v.name}:v{v.index}"
                if spec not in self.protect:
                    mine.append(spec)
                while len(mine) > self.keep:
                    store.delete(mine.pop(0))
                    self.stats.deleted += 1
                report = store.gc(grace_seconds=0)
                self.stats.gc_runs += 1
                self.stats.blobs_freed += report.blobs_freed
                self._stop_event.wait(self.period)
        except Exception:
            self.stats.errors.append(traceback.format_exc())
        finally:
            store.close()


class Readers:
    """Run `fn(rng)` in `n` threads until `deadline`; collect exceptions with their traceback."""

    def __init__(self, n: int, seconds: float, fn: Any, seed: int = 1234) -> None:
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._loop, args=(fn, random.Random(seed + i)), daemon=True,
                                         name=f"reader-{i}") for i in range(n)]

    def _loop(self, fn: Any, rng: random.Random) -> None:
        while time.monotonic() < self.deadline:
            try:
                fn(rng)
            except Exception:
                with self._lock:
                    self.errors.append(traceback.format_exc())
                if len(self.errors) > 20:
                    return

    def run(self) -> None:
        for t in self.threads:
            t.start()
        for t in self.threads:
            t.join(timeout=max(1.0, self.deadline - time.monotonic() + 60))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.errors.append(f"reader threads still running 60 s after the deadline: {alive}")


Snapshot = dict[str, tuple[Any, ...]]


def tree_snapshot(root: str | os.PathLike[str]) -> Snapshot:
    """Path -> (mode, uid, gid, size, mtime_ns, ctime_ns, inode, content sha256 or listing, xattrs)
    of everything under `root`, the root included, symlinks not followed. atime is left out:
    reading a file is allowed to change it."""
    out: Snapshot = {}
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [None, *dirnames, *filenames]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            if name is None and dirpath != base:
                continue  # each directory is recorded once, from its parent's listing
            st = os.lstat(p)
            if os.path.isdir(p) and not os.path.islink(p):
                content: Any = tuple(sorted(os.listdir(p)))
            elif os.path.islink(p):
                content = os.readlink(p)
            else:
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            try:
                xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                      for k in os.listxattr(p, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            out[os.path.relpath(p, base)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns, st.st_ino, content, xattrs)
    return out
