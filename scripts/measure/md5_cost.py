"""Cost of the MD5 in the hashing pass of a checksummed file:// reference (W&B's digest).
Logs a reference to a 1 GiB file into a fresh store, with the MD5 (as shipped) and without it
(ingest.Job's md5 forced off), interleaved, warm page cache and cold (drop_caches), median of 3."""

import os
import shutil
import statistics
import subprocess
import tempfile
import time

import artifactfs.store as store_mod
from artifactfs import Artifact, Store

tmp = tempfile.mkdtemp(prefix="artifactfs-measure-")
big = os.path.join(tmp, "big.bin")
with open(big, "wb") as f:
    for _ in range(1024):
        f.write(os.urandom(1 << 20))


def drop():
    subprocess.run(["sync"])
    open("/proc/sys/vm/drop_caches", "w").write("3\n")


def log(md5: bool) -> float:
    root = tempfile.mkdtemp(dir=tmp)
    s = Store(root)
    real = store_mod.Job
    store_mod.Job = real if md5 else (lambda src, store, md5=False: real(src, store, md5=False))
    try:
        a = Artifact("r")
        a.add_reference("file://" + big)
        t = time.perf_counter()
        s.log_artifact(a)
        dt = time.perf_counter() - t
    finally:
        store_mod.Job = real
        s.close()
        shutil.rmtree(root)
    return dt


res = {}
for cache in ("warm", "cold"):
    for _round in range(3):
        for md5 in (True, False):
            if cache == "cold":
                drop()
            else:
                log(md5)  # warm it
            res.setdefault((cache, md5), []).append(log(md5))
for (cache, md5), v in sorted(res.items()):
    print(
        f"{cache:5s} md5={md5!s:5s} median {statistics.median(v):.3f} s  "
        f"({1024 / statistics.median(v):.0f} MB/s)  runs {[round(x, 3) for x in v]}"
    )
shutil.rmtree(tmp)
