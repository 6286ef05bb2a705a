"""Parallel ingest: hash and store the local files of a draft, skipping unchanged ones.

blake3, xxhash and file I/O release the GIL, so a thread pool sized to the cores scales. A stat
cache keyed by (device, inode, size, mtime_ns, ctime_ns) lets a re-log of an unchanged file skip
reading it at all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .blobs import BlobBackend, Holder
from .digests import Hashes, hash_file
from .errors import ArtifactFSError, one_line
from .files import Fingerprint as StatKey
from .files import fingerprint as stat_key

log = logging.getLogger("artifactfs")

# Told (bytes done, bytes in all) as long work goes on; from any thread, at most ~20 times a second.
Progress = Callable[[int, int], None]


class StatCache(Protocol):
    """What ingest asks of the stat cache (this host's `catalog.host.HostDB`)."""

    def stat_cache_lookup(self, keys: list[StatKey]) -> dict[StatKey, tuple[str, str, str | None]]:
        """(blake3, xxh128, md5 or None) of each file whose fingerprint is unchanged."""
        ...


def default_workers() -> int:
    # I/O waits overlap with hashing: two threads per core measured best on small files.
    return max(2, min(32, (os.cpu_count() or 1) * 2))


class Meter:
    """Counts bytes done from many threads and tells a Progress, throttled (a callback per small
    file would cost more than the file)."""

    INTERVAL = 0.05

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.progress is None:
            return
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.INTERVAL:
                return
            self._last = now
            done = self.done
        self.progress(done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


@dataclass(frozen=True, slots=True)
class Job:
    src: str
    store: bool  # True: copy into the blob store; False: only hash (a checksummed reference)
    md5: bool = False  # also compute the MD5 (W&B's digest of file references and MD5 imports)


@dataclass(frozen=True, slots=True)
class Hashed:
    digest: str
    xxh128: str
    size: int
    key: StatKey  # the file's stat when hashed
    cached: bool  # True when the stat cache answered and nothing was read
    md5: str | None = None


class FileChanged(ArtifactFSError):
    """A source file changed while it was being logged."""


def ingest(jobs: list[Job], blobs: BlobBackend, host: StatCache, *, lease: Holder | None = None,
           progress: Progress | None = None, workers: int | None = None) -> list[Hashed]:
    """Hash (and store) every job's file; results in job order. Progress is in bytes.

    Every blob is held by `lease` before it is written or reused, so gc leaves it alone. A
    stat-cache hit is taken as it is (nothing read; its blob held but not checked here): the
    log's transaction re-writes one that gc took meanwhile.
    """
    keys: list[StatKey] = []
    for j in jobs:
        keys.append(stat_key(os.stat(j.src)))
    try:
        cache = host.stat_cache_lookup(keys) if keys else {}
    except (ArtifactFSError, OSError) as e:  # a cache: without it every file is read
        log.warning("the stat cache cannot be read (every file is hashed): %s", one_line(e))
        cache = {}
    results: list[Hashed | None] = [None] * len(jobs)
    todo: list[int] = []
    meter = Meter(progress, sum(k[2] for k in keys))
    hits: list[str] = []
    for i, (j, k) in enumerate(zip(jobs, keys, strict=True)):
        hit = cache.get(k)
        if hit is not None and not (j.md5 and hit[2] is None):
            results[i] = Hashed(hit[0], hit[1], k[2], k, True, hit[2])
            if j.store:
                hits.append(hit[0])
        else:
            todo.append(i)
    if lease is not None:
        lease.hold_many(hits)
    meter.add(sum(keys[i][2] for i, r in enumerate(results) if r is not None))

    def work(i: int) -> Hashed:
        j = jobs[i]
        for _attempt in range(3):
            counted = 0

            def count(n: int) -> None:
                nonlocal counted
                counted += n
                meter.add(n)

            if j.store:
                r, st0, st1 = blobs.put_file_stat(j.src, lease=lease, md5=j.md5, count=count)
                h = Hashes(r.oid, r.xxh128, r.size, r.md5)
                before, after = stat_key(st0), stat_key(st1)
            else:
                before = stat_key(os.stat(j.src))
                h = hash_file(j.src, md5=j.md5, count=count)
                after = stat_key(os.stat(j.src))
            if before == after and h.size == after[2]:
                return Hashed(h.digest, h.xxh128, h.size, after, False, h.md5)
            meter.add(-counted)  # read again
        raise FileChanged(f"{j.src} kept changing while it was being logged; nothing was logged")

    def work_batch(batch: list[int]) -> list[Hashed]:
        j = jobs[batch[0]]
        if len(batch) == 1 or not j.store:
            return [work(i) for i in batch]
        out: list[Hashed] = []
        puts = blobs.put_files_stat([jobs[i].src for i in batch], lease=lease, md5=j.md5, count=meter.add)
        for i, (r, st0, st1) in zip(batch, puts, strict=True):
            after = stat_key(st1)
            if stat_key(st0) == after and r.size == after[2]:
                out.append(Hashed(r.oid, r.xxh128, r.size, after, False, r.md5))
            else:
                meter.add(-r.size)
                out.append(work(i))  # it changed while read: again, on its own
        return out

    if todo:
        batches = _batches(todo, jobs, keys)
        n = min(workers or default_workers(), len(batches))
        if n == 1:
            done = [work_batch(b) for b in batches]
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="artifactfs-ingest") as pool:
                done = list(pool.map(work_batch, batches))
        for batch, hashed in zip(batches, done, strict=True):
            for i, h in zip(batch, hashed, strict=True):
                results[i] = h
    meter.finish()
    return [r for r in results if r is not None]


# Small files stored go to the blob backend in batches (a pack backend answers a batch with one
# catalog query and one write); a batch is at most this many files and bytes.
BATCH_FILES = 64
BATCH_BYTES = 8 << 20
BATCH_FILE_MAX = 1 << 20  # larger files go one by one


def _batches(todo: list[int], jobs: list[Job], keys: list[StatKey]) -> list[list[int]]:
    """The jobs to do, grouped: small stored files of the same kind together, the rest alone."""
    out: list[list[int]] = []
    open_: dict[bool, tuple[list[int], list[int]]] = {}  # md5 -> (batch, [bytes in it])
    for i in todo:
        j, size = jobs[i], keys[i][2]
        if not j.store or size >= BATCH_FILE_MAX:
            out.append([i])
            continue
        cur = open_.get(j.md5)
        if cur is None or len(cur[0]) >= BATCH_FILES or cur[1][0] + size > BATCH_BYTES:
            cur = open_[j.md5] = ([], [0])
            out.append(cur[0])
        cur[0].append(i)
        cur[1][0] += size
    return out
