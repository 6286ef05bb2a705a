"""Parallel ingest: hash and store the local files of a draft, skipping unchanged ones.

blake3, xxhash and file I/O release the GIL, so a thread pool sized to the cores scales. A stat
cache keyed by (device, inode, size, mtime_ns, ctime_ns) lets a re-log of an unchanged file skip
reading it at all.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .blobstore import BlobStore, hash_file
from .catalog import Catalog
from .errors import ArtifactFSError

StatKey = tuple[int, int, int, int, int]
Progress = Callable[[int, int], None]


def default_workers() -> int:
    # I/O waits overlap with hashing: two threads per core measured best on small files.
    return max(2, min(32, (os.cpu_count() or 1) * 2))


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Job:
    src: str
    store: bool  # True: copy into the blob store; False: only hash (a checksummed reference)


@dataclass(frozen=True, slots=True)
class Hashed:
    digest: str
    xxh128: str
    size: int
    key: StatKey  # the file's stat when hashed
    cached: bool  # True when the stat cache answered and nothing was read


class FileChanged(ArtifactFSError):
    """A source file changed while it was being logged."""


def ingest(jobs: list[Job], blobs: BlobStore, catalog: Catalog, *,
           progress: Progress | None = None, workers: int | None = None) -> list[Hashed]:
    """Hash (and store) every job's file; results in job order.

    A stat-cache hit is taken as it is: its blob is neither touched nor checked here. A log
    that names it in a new version touches it (`touch_hits`), and the log's transaction
    re-writes it if gc took it meanwhile.
    """
    keys: list[StatKey] = []
    for j in jobs:
        keys.append(stat_key(os.stat(j.src)))
    cache = catalog.stat_cache_lookup(keys) if keys else {}
    results: list[Hashed | None] = [None] * len(jobs)
    todo: list[int] = []
    done = 0
    for i, (j, k) in enumerate(zip(jobs, keys)):
        hit = cache.get(k)
        if hit is not None:
            results[i] = Hashed(hit[0], hit[1], k[2], k, True)
            done += 1
        else:
            todo.append(i)
    if progress:
        progress(done, len(jobs))

    def work(i: int) -> Hashed:
        j = jobs[i]
        for _attempt in range(3):
            if j.store:
                r, st0, st1 = blobs.put_file_stat(j.src)
                d, x, size = r.oid, r.xxh128, r.size
                before, after = stat_key(st0), stat_key(st1)
            else:
                before = stat_key(os.stat(j.src))
                d, x, size = hash_file(j.src)
                after = stat_key(os.stat(j.src))
            if before == after and size == after[2]:
                return Hashed(d, x, size, after, False)
        raise FileChanged(f"{j.src} kept changing while it was being logged; nothing was logged")

    if todo:
        n = workers or default_workers()
        if len(todo) == 1 or n == 1:
            for i in todo:
                results[i] = work(i)
                done += 1
                if progress:
                    progress(done, len(jobs))
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="artifactfs-ingest") as pool:
                for i, res in zip(todo, pool.map(work, todo)):
                    results[i] = res
                    done += 1
                    if progress and (done % 64 == 0 or done == len(jobs)):
                        progress(done, len(jobs))
    return [r for r in results if r is not None]


def touch_hits(jobs: list[Job], hashed: list[Hashed], blobs: BlobStore) -> None:
    """Refresh the mtime of every stored stat-cache hit's blob, so gc's grace period covers it
    while the log that reuses it runs (one gc took anyway is re-written in the transaction)."""
    for j, h in zip(jobs, hashed):
        if h.cached and j.store:
            blobs.touch(h.digest)
