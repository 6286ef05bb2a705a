"""Cost of the stat per blob a re-log makes (restoring missing, truncated or noted-corrupt blobs), measured
on the bench's re-log workload shape: 20,000 files of 4-64 KiB, logged once, then re-logged
unchanged with and without the check (Store._restore_blobs replaced by a no-op), interleaved,
median of 7."""

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import make_tree

from artifactfs import Artifact, Store

tmp = tempfile.mkdtemp(prefix="artifactfs-measure-")
src = os.path.join(tmp, "tree")
n = make_tree(src, 20000)
s = Store(os.path.join(tmp, "store"))


def log():
    a = Artifact("t")
    a.add_dir(src)
    t = time.perf_counter()
    v = s.log_artifact(a)
    return time.perf_counter() - t, v


first, v0 = log()
real = Store._restore_blobs
res = {True: [], False: []}
for _ in range(7):
    for check in (True, False):
        Store._restore_blobs = real if check else (lambda *a, **k: None)
        dt, v = log()
        assert v.version == v0.version
        res[check].append(dt)
Store._restore_blobs = real
for check, v in res.items():
    m = statistics.median(v)
    print(f"re-log with stat check={check!s:5s}: median {m * 1000:.0f} ms  runs {[round(x * 1000) for x in v]}")
print(f"first log {first:.2f} s")
s.close()
shutil.rmtree(tmp)
