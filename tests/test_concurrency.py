"""Several processes logging at once get distinct, consecutive versions; nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

WORKERS = 4
VERSIONS_EACH = 5

# Each worker waits for a common start time, opens the store (all at once: for a new store this
# races the catalog's creation), then logs versions of `name`, each with content no other log
# has, and prints the index it got.
WORKER = """
import sys, time
from artifactfs import Artifact, Store
root, worker, start, name = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
while time.time() < start:
    time.sleep(0.001)
store = Store(root=root)
for i in range(int(sys.argv[5])):
    art = Artifact(name, type="dataset")
    with art.new_file("data.txt") as f:
        f.write(f"worker {worker} log {i}\\n")
    print(store.log_artifact(art).index, flush=True)
"""


def run_workers(root: Path, names: list[str], versions_each: int) -> list[list[int]]:
    start = time.time() + 1.5  # after every interpreter has imported artifactfs
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(w), str(start), name,
                               str(versions_each)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, name in enumerate(names)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # reached with live workers only when one timed out
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
    return [[int(x) for x in out.split()] for out, _err in results]


def test_concurrent_logs_get_distinct_consecutive_versions(open_store, store_root: Path) -> None:
    open_store(store_root)
    got = run_workers(store_root, ["shared"] * WORKERS, VERSIONS_EACH)
    all_indexes = sorted(i for g in got for i in g)
    assert all_indexes == list(range(WORKERS * VERSIONS_EACH))
    for g in got:
        assert g == sorted(g)  # each worker's own logs are in order


def test_concurrent_logs_lose_no_content(open_store, store_root: Path) -> None:
    open_store(store_root)
    got = run_workers(store_root, ["shared"] * WORKERS, VERSIONS_EACH)
    store = open_store(store_root)
    versions = store.versions("shared")
    assert [v.index for v in versions] == list(range(WORKERS * VERSIONS_EACH))
    content = {v.index: (Path(v.download(root=str(store_root.parent / "dl" / v.version))) / "data.txt")
               .read_bytes() for v in versions}
    expected = {f"worker {w} log {i}\n".encode() for w in range(WORKERS) for i in range(VERSIONS_EACH)}
    assert set(content.values()) == expected
    for w, indexes in enumerate(got):
        assert [content[i] for i in indexes] == [f"worker {w} log {i}\n".encode()
                                                 for i in range(VERSIONS_EACH)]
    assert store.artifact("shared:latest").index == WORKERS * VERSIONS_EACH - 1
    assert store.fsck().ok


def test_concurrent_first_use_of_a_new_store(open_store, store_root: Path) -> None:
    names = [f"art{w}" for w in range(2 * WORKERS)]
    got = run_workers(store_root, names, 2)
    assert got == [[0, 1]] * len(names)
    assert sorted(open_store(store_root).artifacts()) == names
