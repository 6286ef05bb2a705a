"""artifactfs benchmarks: what users feel, as ratios to a baseline measured in the same run.

Every workload runs its contenders interleaved (A B A B ...) and reports the median, min and
max of the runs; the ratio is contender / baseline in throughput (higher is better). Data is
generated with a fixed seed in a temporary directory and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import blake3

from artifactfs import Artifact, Store

SEED = 20261127


@dataclass
class Row:
    workload: str
    contender: str
    unit: str               # what `values` count per second: "files/s", "MB/s"
    values: list[float] = field(default_factory=list)  # throughput of each run
    baseline: str | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- data -------------------------------------------------------------------------------------

def make_tree(root: str, n: int, lo: int = 4096, hi: int = 65536) -> int:
    """n files of lo..hi bytes in 100-file directories; returns total bytes."""
    rng = random.Random(SEED)
    pool = rng.randbytes(hi * 64)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"d{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        size = rng.randint(lo, hi)
        off = rng.randint(0, len(pool) - size)
        # Unique head so no two files dedup into one blob.
        data = i.to_bytes(8, "little") + pool[off:off + size - 8]
        with open(os.path.join(d, f"f{i:06d}.bin"), "wb") as f:
            f.write(data)
        total += size
    os.sync()  # measure our writes, not the write-back of the generated data
    return total


def make_large(path: str, size: int) -> None:
    rng = random.Random(SEED + 1)
    block = rng.randbytes(16 << 20)
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            n = min(len(block), size - written)
            f.write(i.to_bytes(8, "little") + block[8:n])
            written += n
            i += 1
    os.sync()


def list_files(root: str) -> list[str]:
    out = []
    for dp, _dn, fns in os.walk(root):
        out.extend(os.path.join(dp, fn) for fn in fns)
    out.sort()
    return out


def blake3_files(paths: list[str], workers: int) -> None:
    def one(p: str) -> str:
        with open(p, "rb") as f:
            return blake3.blake3(f.read()).hexdigest()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths))


def blake3_large(path: str) -> None:
    blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path)


# -- workloads --------------------------------------------------------------------------------

def ingest_tree(tmp: str, runs: int, n_files: int) -> list[Row]:
    src = os.path.join(tmp, "tree")
    total = make_tree(src, n_files)
    paths = list_files(src)
    mb = total / 1e6
    workers = max(2, (os.cpu_count() or 1) * 2)
    base = Row("ingest-tree", "blake3 thread pool (hashing limit)", "files/s")
    first = Row("ingest-tree", "artifactfs log (first)", "files/s", baseline=base.contender)
    again = Row("ingest-tree", "artifactfs log again, unchanged", "files/s", baseline=first.contender)
    cpr = Row("ingest-tree", "cp -r + sync into the store's filesystem", "files/s")
    first_cp = Row("ingest-tree", "artifactfs log (first) vs cp -r", "files/s", baseline=cpr.contender)
    base_mb = Row("ingest-tree", "blake3 thread pool (hashing limit)", "MB/s")
    first_mb = Row("ingest-tree", "artifactfs log (first)", "MB/s", baseline=base_mb.contender)
    blake3_files(paths, workers)  # warm the page cache
    for r in range(runs):
        t = timed(lambda: blake3_files(paths, workers))
        base.values.append(len(paths) / t)
        base_mb.values.append(mb / t)
        store_root = os.path.join(tmp, f"store-tree-{r}")
        store = Store(store_root)

        def log() -> None:
            a = Artifact("tree", "dataset")
            a.add_dir(src)
            store.log_artifact(a)
        t = timed(log)
        first.values.append(len(paths) / t)
        first_cp.values.append(len(paths) / t)
        first_mb.values.append(mb / t)
        t = timed(log)
        again.values.append(len(paths) / t)
        store.close()
        shutil.rmtree(store_root)
        dest = os.path.join(tmp, "cp-tree")
        # cp -r writes the same files without hashing: the file-creation limit of this filesystem.
        cpr.values.append(len(paths) / timed(lambda: subprocess.run(["cp", "-r", src, dest], check=True) and os.sync()))
        shutil.rmtree(dest)
    return [base, first, again, cpr, first_cp, base_mb, first_mb]


def ingest_large(tmp: str, runs: int, size: int) -> list[Row]:
    path = os.path.join(tmp, "large.bin")
    make_large(path, size)
    mb = size / 1e6
    base = Row("ingest-large", "blake3 (all threads)", "MB/s")
    cp = Row("ingest-large", "cp + sync into the store's filesystem", "MB/s")
    log = Row("ingest-large", "artifactfs log", "MB/s", baseline=cp.contender)
    log_vs_hash = Row("ingest-large", "artifactfs log vs blake3", "MB/s", baseline=base.contender)
    again = Row("ingest-large", "artifactfs log again, unchanged", "MB/s", baseline=log.contender)
    blake3_large(path)
    for r in range(runs):
        base.values.append(mb / timed(lambda: blake3_large(path)))
        dest = os.path.join(tmp, "cp-copy.bin")
        # With a sync: a log returns only once its blobs are durable, so cp must too.
        cp.values.append(mb / timed(lambda: subprocess.run(["cp", path, dest], check=True) and os.sync()))
        os.unlink(dest)
        store_root = os.path.join(tmp, f"store-large-{r}")
        store = Store(store_root)

        def do_log() -> None:
            a = Artifact("large", "model")
            a.add_file(path)
            store.log_artifact(a)
        t = timed(do_log)
        log.values.append(mb / t)
        log_vs_hash.values.append(mb / t)
        again.values.append(mb / timed(do_log))
        store.close()
        shutil.rmtree(store_root)
    return [base, cp, log, log_vs_hash, again]


class Mount:
    """`artifactfs mount` through the installed command; always unmounted, also on Ctrl-C."""

    def __init__(self, store_root: str, mountpoint: str) -> None:
        self.store_root, self.mountpoint = store_root, mountpoint

    def __enter__(self) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        subprocess.run([sys.executable, "-m", "artifactfs", "--store", self.store_root, "mount", self.mountpoint],
                       check=True)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        r = subprocess.run([sys.executable, "-m", "artifactfs", "umount", self.mountpoint])
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint])


def read_file(path: str, bufsize: int = 1 << 20) -> int:
    buf = bytearray(bufsize)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def read_files(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.read()


def find_stat(root: str) -> int:
    # find(1) with -printf forces an lstat of every entry, as `ls -lR` does.
    out = subprocess.run(["find", root, "-printf", "%s %m\n"], check=True, capture_output=True).stdout
    return out.count(b"\n")


def read_large(tmp: str, runs: int, size: int) -> list[Row]:
    path = os.path.join(tmp, "large.bin")
    if not os.path.exists(path):
        make_large(path, size)
    store_root = os.path.join(tmp, "store-read-large")
    store = Store(store_root)
    a = Artifact("large", "model")
    a.add_file(path)
    v = store.log_artifact(a)
    blob = store.blobs.path(v.get_path("large.bin").blob or "")
    mb = size / 1e6
    rows = []
    with Mount(store_root, os.path.join(tmp, "mnt")) as mnt:
        via = os.path.join(mnt, "large", "v0", "large.bin")
        can_drop = drop_caches()
        if can_drop:
            cold_n = Row("read-large", "native read, cold", "MB/s")
            cold_m = Row("read-large", "through the mount, cold", "MB/s", baseline=cold_n.contender)
            for _ in range(runs):
                drop_caches()
                cold_n.values.append(mb / timed(lambda: read_file(blob)))
                drop_caches()
                cold_m.values.append(mb / timed(lambda: read_file(via)))
            rows += [cold_n, cold_m]
        else:
            print("read-large: cannot drop caches (not root?): cold reads skipped", file=sys.stderr)
        warm_n = Row("read-large", "native read, warm", "MB/s")
        warm_m = Row("read-large", "through the mount, warm", "MB/s", baseline=warm_n.contender)
        read_file(blob)
        read_file(via)
        for _ in range(runs):
            warm_n.values.append(mb / timed(lambda: read_file(blob)))
            warm_m.values.append(mb / timed(lambda: read_file(via)))
        rows += [warm_n, warm_m]
    store.close()
    shutil.rmtree(store_root)
    return rows


def read_small(tmp: str, runs: int, n_files: int) -> list[Row]:
    src = os.path.join(tmp, "tree")
    if not os.path.exists(src):
        make_tree(src, n_files)
    store_root = os.path.join(tmp, "store-read-small")
    store = Store(store_root)
    a = Artifact("tree", "dataset")
    a.add_dir(src)
    v = store.log_artifact(a)
    blobs = [store.blobs.path(e.blob or "") for e in v.files()]
    nat = Row("read-small", "native: open, read, close each", "files/s")
    via = Row("read-small", "through the mount, one process", "files/s", baseline=nat.contender)
    with Mount(store_root, os.path.join(tmp, "mnt")) as mnt:
        mpaths = [os.path.join(mnt, "tree", "v0", e.path) for e in v.files()]
        read_files(blobs)
        read_files(mpaths)
        for _ in range(runs):
            nat.values.append(len(blobs) / timed(lambda: read_files(blobs)))
            via.values.append(len(mpaths) / timed(lambda: read_files(mpaths)))
    store.close()
    shutil.rmtree(store_root)
    return [nat, via]


def metadata(tmp: str, runs: int, n_entries: int) -> list[Row]:
    """find + stat over n entries, first pass (nothing cached) and second pass."""
    src = os.path.join(tmp, "meta")
    for i in range(n_entries):
        d = os.path.join(src, f"d{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"e{i:07d}"), "wb") as f:
            f.write(b"x")
    # Entries by reference (no checksum): the tree is the catalog's, no blob per entry needed.
    store_root = os.path.join(tmp, "store-meta")
    store = Store(store_root)
    a = Artifact("meta", "dataset")
    a.add_reference("file://" + src, checksum=False)
    store.log_artifact(a)
    store.close()
    rows = []
    first_n = Row("metadata", "native find+stat, first pass", "entries/s")
    first_m = Row("metadata", "through the mount, first pass", "entries/s", baseline=first_n.contender)
    second_n = Row("metadata", "native find+stat, second pass", "entries/s")
    second_m = Row("metadata", "through the mount, second pass", "entries/s", baseline=second_n.contender)
    for _ in range(runs):
        drop_caches()
        first_n.values.append(n_entries / timed(lambda: find_stat(src)))
        second_n.values.append(n_entries / timed(lambda: find_stat(src)))
        # A fresh mount each run: nothing cached in the kernel or the daemon.
        with Mount(store_root, os.path.join(tmp, "mnt")) as mnt:
            root = os.path.join(mnt, "meta", "v0")
            first_m.values.append(n_entries / timed(lambda: find_stat(root)))
            second_m.values.append(n_entries / timed(lambda: find_stat(root)))
    rows += [first_n, first_m, second_n, second_m]
    shutil.rmtree(store_root)
    return rows


WORKLOADS = {
    "ingest-tree": ingest_tree,
    "ingest-large": ingest_large,
    "read-large": read_large,
    "read-small": read_small,
    "metadata": metadata,
}
ALIASES = {"ingest": ["ingest-tree", "ingest-large"], "read": ["read-large", "read-small", "metadata"]}


def ratio(rows: list[Row], row: Row) -> float | None:
    if row.baseline is None:
        return None
    for b in rows:
        if b.workload == row.workload and b.contender == row.baseline and b.unit == row.unit:
            return row.median / b.median
    return None


def main() -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help=f"any of {', '.join([*WORKLOADS, *ALIASES])} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer runs (< 3 minutes)")
    p.add_argument("--runs", type=int, default=None, help="runs per contender (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--tmp", metavar="DIR", default=None, help="where to generate data (default: $TMPDIR)")
    a = p.parse_args()
    chosen: list[str] = []
    for w in a.workloads or list(WORKLOADS):
        if w in ALIASES:
            chosen.extend(ALIASES[w])
        elif w in WORKLOADS:
            chosen.append(w)
        else:
            p.error(f"unknown workload {w!r}")
    runs = a.runs or 3
    n_files = 2_000 if a.quick else 20_000
    large = (512 << 20) if a.quick else (2 << 30)
    rows: list[Row] = []
    tmp = tempfile.mkdtemp(prefix="artifactfs-bench-", dir=a.tmp)
    try:
        for w in chosen:
            print(f"running {w} ...", file=sys.stderr, flush=True)
            if w in ("ingest-tree", "read-small"):
                rows += WORKLOADS[w](tmp, runs, n_files)
            elif w in ("ingest-large", "read-large"):
                rows += WORKLOADS[w](tmp, runs, large)
            elif w == "metadata":
                rows += metadata(tmp, runs, 10_000 if a.quick else 100_000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'workload':<14} {'contender':<38} {'median':>10} {'min':>10} {'max':>10}  {'unit':<8} ratio")
    out = []
    for r in rows:
        rt = ratio(rows, r)
        print(f"{r.workload:<14} {r.contender:<38} {r.median:>10.1f} {min(r.values):>10.1f} {max(r.values):>10.1f}  "
              f"{r.unit:<8} {'' if rt is None else f'{rt:.2f}x ' + (r.baseline or '')}")
        out.append({"workload": r.workload, "contender": r.contender, "unit": r.unit, "median": r.median,
                    "min": min(r.values), "max": max(r.values), "runs": r.values, "baseline": r.baseline,
                    "ratio": rt, "note": r.note})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "quick": a.quick, "cpus": os.cpu_count(), "results": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
