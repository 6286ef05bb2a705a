"""This host's cache, ``<root>/cache/``: verified copies of what lives elsewhere, bounded.

It holds a bucket store's blobs (``<oid[:2]>/<oid>``) and packs (``packs/<name>.pack``), and
the fetched content of s3:// and http(s):// references (``refs/<key[:2]>/<key>``), whatever the
store's blobs. Every process on the host shares it: a copy enters by a rename of a finished,
verified temp file (``tmp/``), so a reader never sees a partial one; the least recently used
go first when it outgrows its bound, and removing a name never takes the bytes from a reader
that has the file open.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from .leases import pid_alive

__all__ = ["HostCache", "PACK_GRACE", "FETCH_CHUNK", "FETCH_THREADS", "touch"]

log = logging.getLogger("artifactfs.cache")

# A large copy is fetched in ranges of this size, this many at once (a bucket's blob, a remote
# reference's object).
FETCH_CHUNK = 8 << 20
FETCH_THREADS = 8
# Packs written this recently are never trimmed: a log may not have uploaded them yet.
PACK_GRACE = 600.0
# A temp file this old whose writer is gone is removed at the next trim.
TEMP_GRACE = 3600.0

_counter = itertools.count()


def touch(fd: int) -> None:
    """Mark a cached copy used now (the cache's order is by mtime: atime is not kept reliably)."""
    try:
        os.utime(fd)
    except OSError:
        pass  # a cache another user owns: its order is theirs


class HostCache:
    """``<root>/cache/`` with its bound (bytes): counts what enters, trims the oldest."""

    def __init__(self, dir: str, size: int) -> None:
        self.dir = dir
        self.tmpdir = os.path.join(dir, "tmp")
        self.size = size
        self.on_trim: list[Callable[[], None]] = []  # called after a trim removed something
        self._added = 0  # bytes added since the cache was last trimmed
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HostCache({self.dir!r}, {self.size})"

    def tmp_name(self) -> str:
        """A new temp file name (``<pid>-<thread>-<n>.tmp``: gc knows a dead writer's by its pid)."""
        os.makedirs(self.tmpdir, exist_ok=True)  # the cache may have been emptied by hand
        return os.path.join(self.tmpdir, f"{os.getpid()}-{threading.get_ident()}-{next(_counter)}.tmp")

    def install(self, tmp: str, dest: str) -> None:
        """Rename a finished, verified temp file to `dest` in the cache, and count it."""
        size = os.path.getsize(tmp)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
        self.grew(size)

    def grew(self, n: int) -> None:
        """Count bytes added; past an eighth of the bound since the last look, trim."""
        with self._lock:
            self._added += n
            due = self._added >= max(self.size // 8, 1)
            if due:
                self._added = 0
        if due:
            self.trim()

    def files(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every copy in the cache."""
        out: list[tuple[float, int, str]] = []
        packs = os.path.join(self.dir, "packs")
        refs = os.path.join(self.dir, "refs")
        for d in (self.dir, packs, refs):
            try:
                top = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in top:
                if d != packs and len(e.name) == 2 and e.is_dir(follow_symlinks=False):
                    try:
                        inner = list(os.scandir(e.path))
                    except FileNotFoundError:
                        continue
                elif d == packs and e.name.endswith(".pack"):
                    inner = [e]
                else:
                    continue
                for f in inner:
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # another process trimmed it
                    out.append((st.st_mtime, st.st_size, f.path))
        return out

    def usage(self) -> tuple[int, int]:
        """(files, bytes) the cache holds now."""
        files = self.files()
        return len(files), sum(n for _, n, _ in files)

    def trim(self, limit: int | None = None) -> tuple[int, int]:
        """Remove the least recently used copies until the cache holds at most `limit` bytes
        (default: seven eighths of the bound); (files, bytes) removed. Packs written in the last
        PACK_GRACE seconds stay (a log in progress uploads its packs before its commit), so a
        cache smaller than what one log packs exceeds its bound until that log is over."""
        # By default, room for the eighth of the bound a process adds before it trims again
        # (grew): the cache stays within its bound.
        goal = limit if limit is not None else self.size - max(self.size // 8, 1)
        self._sweep_temp()
        files = self.files()
        total = sum(n for _, n, _ in files)
        if total <= goal:
            return 0, 0
        now = time.time()
        removed = freed = 0
        for mtime, size, path in sorted(files):
            if total <= goal:
                break
            if mtime > now - PACK_GRACE and path.endswith(".pack"):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            total -= size
            removed += 1
            freed += size
        if removed:
            for fn in self.on_trim:
                fn()
            log.info("cache trimmed: %d files, %d bytes removed", removed, freed)
        return removed, freed

    def _sweep_temp(self) -> None:
        """Remove temp files of fetches whose process is gone (a kill -9 mid-fetch)."""
        try:
            it = list(os.scandir(self.tmpdir))
        except FileNotFoundError:
            return
        cutoff = time.time() - TEMP_GRACE
        for f in it:
            head = f.name.split("-", 1)[0]
            try:
                if head.isdigit() and not pid_alive(int(head)) and f.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(f.path)
            except FileNotFoundError:
                continue
