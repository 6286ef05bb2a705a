"""Groundwork for pack files (issue 11): what bounds logging a tree of small files, and from
which size a blob is better loose than packed.

Part 1, on N files of 4-64 KiB (fixed seed, page cache warm), interleaved, medians of --runs:
  - blake3 thread pool: read + hash every file (the hashing limit `scripts/bench` uses);
  - artifactfs log today: one blob file each, one syncfs, one catalog commit;
  - pack prototype: the same threads read + hash (blake3 and XXH128, as a log does) and append
    each file to the pack of their own thread, one fsync per pack and one of its directory,
    then the same catalog commit a log makes (rows built from the hashes);
  - the same without the catalog commit (what the blob side alone costs).
Part 2, a threshold sweep: 64 MiB of blobs of one size, written loose (temp file + rename into
a fan-out directory, then syncfs) or appended to one pack (then fsync), MB/s each.

Run: .venv/bin/python scripts/measure/pack_ingest.py [--files N] [--runs R] [--tmp DIR]
Nothing here is the product: the pack writer is a sketch to measure, not to ship.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import blake3

from artifactfs import Artifact, Store
from artifactfs.catalog import EntryRow, LogCommit
from artifactfs.digests import hash_bytes
from artifactfs.files import syncfs
from artifactfs.ingest import default_workers
from artifactfs.manifest import manifest_digest


def make_tree(root: str, n: int) -> list[str]:
    rng = random.Random(11)
    paths = []
    for i in range(n):
        d = os.path.join(root, f"d{i // 1000:03}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"f{i:05}.bin")
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.randint(4 << 10, 64 << 10)))
        paths.append(p)
    return paths


def read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def hashing_limit(paths: list[str], workers: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda p: blake3.blake3(read(p)).hexdigest(), paths))
    return time.perf_counter() - t


def log_today(src: str, tmp: str) -> float:
    root = tempfile.mkdtemp(dir=tmp)
    s = Store(root)
    try:
        a = Artifact("tree", type="dataset")
        a.add_dir(src)
        t = time.perf_counter()
        s.log_artifact(a)
        return time.perf_counter() - t
    finally:
        s.close()
        shutil.rmtree(root)


def pack_prototype(paths: list[str], src: str, tmp: str, workers: int, commit: bool) -> float:
    root = tempfile.mkdtemp(dir=tmp)
    s = Store(root)
    packdir = os.path.join(root, "blobs", "packs")
    os.makedirs(packdir)
    local = threading.local()
    fds: list[int] = []
    lock = threading.Lock()

    def one(p: str) -> tuple[str, str, int, int, int]:
        pack = getattr(local, "pack", None)
        if pack is None:
            fd = os.open(os.path.join(packdir, f"{threading.get_ident()}.pack"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o444)
            local.pack = pack = [fd, 0]
            with lock:
                fds.append(fd)
        data = read(p)
        h = hash_bytes(data)
        offset = pack[1]
        view = memoryview(data)
        while view:
            view = view[os.write(pack[0], view):]
        pack[1] += len(data)
        return h.digest, h.xxh128, h.size, pack[0], offset

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            got = list(ex.map(one, paths))
        for fd in fds:
            os.fsync(fd)
        dfd = os.open(packdir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        if commit:
            rows = [EntryRow(os.path.relpath(p, src), d, n, None, d, x, {}) for p, (d, x, n, _, _) in zip(
                paths, got, strict=True)]
            s.catalog.commit_log(LogCommit("tree", "dataset", manifest_digest(rows), None, {}, time.time(),
                                           rows, ["latest"]), lambda: [])
        return time.perf_counter() - t
    finally:
        for fd in fds:
            os.close(fd)
        s.close()
        shutil.rmtree(root)


def sweep(tmp: str, size: int, total: int = 64 << 20) -> tuple[float, float]:
    """(loose MB/s, packed MB/s) for `total` bytes of blobs of `size` bytes."""
    n = max(1, total // size)
    blobs = [os.urandom(size) for _ in range(min(n, 64))]
    d = tempfile.mkdtemp(dir=tmp)
    try:
        os.makedirs(os.path.join(d, "tmp"))
        t = time.perf_counter()
        for i in range(n):
            name = f"{i:064x}"
            tmpf = os.path.join(d, "tmp", f"{i}.tmp")
            fd = os.open(tmpf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.write(fd, blobs[i % len(blobs)])
            os.close(fd)
            fan = os.path.join(d, name[-2:])
            try:
                os.replace(tmpf, os.path.join(fan, name))
            except FileNotFoundError:
                os.makedirs(fan)
                os.replace(tmpf, os.path.join(fan, name))
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        syncfs(dfd)
        os.close(dfd)
        loose = time.perf_counter() - t
        t = time.perf_counter()
        fd = os.open(os.path.join(d, "one.pack"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o444)
        for i in range(n):
            os.write(fd, blobs[i % len(blobs)])
        os.fsync(fd)
        os.close(fd)
        packed = time.perf_counter() - t
    finally:
        shutil.rmtree(d)
    mb = n * size / 1e6
    return mb / loose, mb / packed


def median_of(runs: int, fns: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():  # interleaved: A B C D A B C D ...
            out[k].append(fn())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tmp", default=None, help="where to generate data (default: $TMPDIR)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="artifactfs-measure-", dir=a.tmp)
    workers = default_workers()
    try:
        src = os.path.join(tmp, "src")
        paths = make_tree(src, a.files)
        nbytes = sum(os.path.getsize(x) for x in paths)
        hashing_limit(paths, workers)  # warm the page cache
        res = median_of(a.runs, {
            "blake3 thread pool (hashing limit)": lambda: hashing_limit(paths, workers),
            "artifactfs log today (loose blobs)": lambda: log_today(src, tmp),
            "pack prototype + catalog commit": lambda: pack_prototype(paths, src, tmp, workers, True),
            "pack prototype, blobs only": lambda: pack_prototype(paths, src, tmp, workers, False),
        })
        base = statistics.median(res["blake3 thread pool (hashing limit)"])
        print(f"{a.files} files, {nbytes / 1e6:.0f} MB, {workers} threads, {a.runs} interleaved runs (medians)")
        for k, v in res.items():
            m = statistics.median(v)
            print(f"  {k:38} {a.files / m:9.0f} files/s  {base / m:5.2f}x the hashing limit"
                  f"  (runs {', '.join(f'{a.files / x:.0f}' for x in v)})")
        print("threshold sweep: 64 MiB of blobs of one size, loose (+syncfs) vs one pack (+fsync), MB/s")
        for size in (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20):
            ls, ps = zip(*(sweep(tmp, size) for _ in range(a.runs)), strict=True)
            print(f"  {size >> 10:6} KiB  loose {statistics.median(ls):8.0f}  packed {statistics.median(ps):8.0f}"
                  f"  packed/loose {statistics.median(ps) / statistics.median(ls):5.2f}x")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
