"""gc running while a log is in progress never deletes a blob that the log then refers to.

The in-process tests run gc from a second Store (its own catalog connection, as another process
would have) at a chosen moment of a log; the stress test runs loggers and a gc loop as separate
processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import b3

from artifactfs import Artifact, ArtifactFSError, Store
from artifactfs.blobs.local import LocalBlobs


def draft(data_dir: Path, name: str = "ds") -> Artifact:
    art = Artifact(name, type="dataset")
    art.add_dir(data_dir)
    with art.new_file("staged.txt") as f:
        f.write("staged content, never logged before\n")
    return art


def gc_at_first_sync(store: Store, other: Store, monkeypatch: pytest.MonkeyPatch, grace: float = 0,
                     also=None) -> list:
    """Make `other` collect garbage right after the log's blobs are written and synced, before its
    catalog transaction begins (once). Returns the list the gc reports go to."""
    reports: list = []
    orig = store.blobs.sync

    def sync_then_gc() -> None:
        orig()
        if not reports:
            if also is not None:
                also()
            reports.append(other.gc(grace_seconds=grace))

    monkeypatch.setattr(store.blobs, "sync", sync_then_gc)
    return reports


def test_gc_during_a_log_frees_nothing_the_log_holds(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reports = gc_at_first_sync(store, open_store(store.root), monkeypatch)
    v = store.log_artifact(draft(data_dir))
    assert reports and reports[0].blobs_freed == 0
    v.verify()


def test_fsck_is_clean_after_gc_raced_a_log(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc_at_first_sync(store, open_store(store.root), monkeypatch)
    store.log_artifact(draft(data_dir))
    report = store.fsck()
    assert report.ok, [str(d) for d in report.damage]


def test_gc_during_a_log_spares_the_deleted_blobs_the_log_reuses_from_the_stat_cache(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # v0 fills the stat cache; once deleted, its blobs are garbage but for the next log's lease.
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    store.delete("ds:v0")
    reports = gc_at_first_sync(store, open_store(store.root), monkeypatch)
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert reports[0].blobs_freed == 0
    v.verify()


def lose(store: Store, oid: str) -> None:
    """Take a blob as gc would: its loose file, or its location in a pack."""
    if store.blobs.locate(oid) is not None:
        store.catalog.collect(lambda col: col.unpack([oid]))
    else:
        store.blobs.remove_many([oid])


def files_on_disk(root: str | os.PathLike[str]) -> set[str]:
    """The loose blob files and pack files under a store's blobs/."""
    blobs = Path(root) / "blobs"
    return {str(p.relative_to(blobs)) for p in [*blobs.glob("??/*"), *blobs.glob("packs/*.pack")]}


def test_blobs_collected_before_the_log_held_them_are_written_again(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one race a lease leaves: gc listed a present blob the log then found and held. The
    log's transaction, which holds the write lock gc deletes under, writes it again."""
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    store.delete("ds:v0")
    orig = store.blobs.sync
    gone: list[str] = []

    def sync_then_lose_a_blob() -> None:
        orig()
        if not gone:
            oid = b3((data_dir / "a.txt").read_bytes())
            lose(store, oid)  # as that gc would
            gone.append(oid)

    monkeypatch.setattr(store.blobs, "sync", sync_then_lose_a_blob)
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert gone and store.blobs.has(gone[0])
    v.verify()
    assert store.fsck().ok


def test_gc_with_its_grace_period_frees_nothing_a_running_log_wrote(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reports = gc_at_first_sync(store, open_store(store.root), monkeypatch, grace=3600)
    store.log_artifact(draft(data_dir))
    assert reports[0].blobs_freed == 0


def test_gc_during_a_blob_write_does_not_fail_the_log(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc(grace_seconds=0) between a blob's temp write and its rename: the temp file belongs to a
    live writer (its PID is in the name), so the log must still succeed."""
    other = open_store(store.root)
    orig = LocalBlobs._install
    ran: list = []

    def gc_then_install(self: LocalBlobs, tmp: str, oid: str, **kw: bool) -> bool:
        if not ran:
            ran.append(other.gc(grace_seconds=0))
        return orig(self, tmp, oid, **kw)

    monkeypatch.setattr(LocalBlobs, "_install", gc_then_install)
    v = store.log_artifact(draft(data_dir))
    v.verify()


def test_an_artifact_reference_holds_its_targets_blobs_while_the_log_runs(
        store: Store, open_store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target version is deleted and collected mid-log: the log's lease holds the blobs it
    named, so the new version is whole."""
    base = Artifact("base", type="dataset")
    with base.new_file("x.txt") as f:
        f.write("only in base:v0\n")
    store.log_artifact(base)
    other = open_store(store.root)
    reports = gc_at_first_sync(store, other, monkeypatch, also=lambda: other.delete("base:v0"))
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/x.txt")
    with art.new_file("own.txt") as f:
        f.write("the log's own file\n")
    v = store.log_artifact(art)
    assert reports[0].blobs_freed == 0 and "base" not in store.artifacts()
    v.verify()
    assert store.fsck().ok


def test_an_artifact_reference_whose_blob_vanished_before_the_commit_is_refused(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob the log cannot write again (it has no source of it) and that is gone: refused."""
    base = Artifact("base", type="dataset")
    with base.new_file("x.txt") as f:
        f.write("only in base:v0\n")
    oid = store.log_artifact(base).get_path("x.txt").blob or ""
    orig = store.blobs.sync

    def sync_then_lose_it() -> None:
        orig()
        if store.blobs.has(oid):
            lose(store, oid)  # the one window a lease leaves, forced

    monkeypatch.setattr(store.blobs, "sync", sync_then_lose_it)
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/x.txt")
    with pytest.raises(ArtifactFSError, match="missing from the store"):
        store.log_artifact(art)
    assert "derived" not in store.artifacts()


# -- several processes ---------------------------------------------------------------------------

LOGGER = r'''
import json, random, sys, time
from artifactfs import Artifact, Store
root, worker, start, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rng = random.Random(worker)
# A small pool of contents shared by every worker: blobs are reused across versions, so a blob
# that a delete made garbage is often what the next log needs.
POOL = [f"shared content {i}\n".encode() * (i + 1) for i in range(8)]
while time.time() < start:
    time.sleep(0.001)
store = Store(root)
mine = []
n = 0
while time.time() < stop:
    art = Artifact("ds", type="dataset")
    for j in range(5):
        with art.new_file(f"f{j}.bin", mode="wb") as f:
            f.write(POOL[rng.randrange(len(POOL))])
    with art.new_file("own.txt") as f:
        f.write(f"worker {worker} log {n}\n")
    v = store.log_artifact(art)
    print(json.dumps({"index": v.index, "digest": v.digest}), flush=True)
    mine.append(v.version)
    if len(mine) > 1 and rng.random() < 0.6:
        store.delete("ds:" + mine.pop(0))
    n += 1
'''

GC_LOOP = r'''
import sys, time
from artifactfs import Store
root, start, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
store = Store(root)
freed = runs = 0
while time.time() < stop:
    freed += store.gc(grace_seconds=0).blobs_freed
    runs += 1
    # A pause between runs, as any real gc has: back to back, gc re-takes SQLite's write lock
    # before a waiting log's busy handler wakes, and the loggers starve (1-5 logs in 3 s).
    time.sleep(0.003)
print(freed, runs, flush=True)
'''

LOGGERS = 4
STRESS_SECONDS = 3.0


@pytest.fixture(scope="module")
def stressed(tmp_path_factory: pytest.TempPathFactory):
    """A store after 4 loggers (deleting some of their versions) and a gc loop ran together."""
    root = tmp_path_factory.mktemp("gc-stress") / "store"
    Store(root).close()
    start = time.time() + 1.0
    stop = start + STRESS_SECONDS
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, str(root), str(w), str(start), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(LOGGERS)]
    procs.append(subprocess.Popen([sys.executable, "-c", GC_LOOP, str(root), str(start), str(stop)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return root, procs, results


def test_loggers_racing_gc_all_succeed(stressed) -> None:
    _root, procs, results = stressed
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err


def test_gc_loop_freed_blobs_during_the_stress(stressed) -> None:
    _root, _procs, results = stressed
    freed, runs = map(int, results[-1][0].split())
    assert runs > 1 and freed > 0, "the gc loop never collected anything: no race was exercised"


def test_fsck_is_clean_after_loggers_raced_gc(stressed, open_store) -> None:
    root, _procs, _results = stressed
    report = open_store(root).fsck()
    assert report.ok, [str(d) for d in report.damage]


def test_every_surviving_version_verifies_after_loggers_raced_gc(stressed, open_store) -> None:
    root, _procs, results = stressed
    logged = {}
    for out, _err in results[:LOGGERS]:
        for line in out.split("\n"):
            if line:
                rec = json.loads(line)
                logged[rec["index"]] = rec["digest"]
    s = open_store(root)
    versions = s.versions("ds")
    assert versions, "every version was deleted: nothing to check"
    for v in versions:
        assert v.digest == logged[v.index], f"{v.qualified_name} is not what its logger logged"
        assert v.file_count == 6
        v.verify()


# -- leases across processes ----------------------------------------------------------------------

PAUSED_LOG = r'''
import os, signal, sys, time
from artifactfs import Artifact, Store
from artifactfs.blobs.local import LocalBlobs
root, src, ready, go, how = sys.argv[1:6]
orig = LocalBlobs.sync

def paused_sync(self):
    orig(self)
    open(ready, "w").close()            # every blob is written and synced; the commit is next
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while not os.path.exists(go):       # a slow log: gc runs now, in another process
        time.sleep(0.01)

LocalBlobs.sync = paused_sync
store = Store(root)
art = Artifact("slow", type="dataset")
art.add_dir(src)
print(store.log_artifact(art).version, flush=True)
'''


def start_paused_log(root: Path, src: Path, tmp_path: Path, how: str) -> tuple[subprocess.Popen[str], Path, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_LOG, str(root), str(src), str(ready), str(go), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None or how == "kill", proc.communicate()
        assert time.monotonic() < deadline, "the log never reached its commit"
        time.sleep(0.01)
    return proc, ready, go


def test_gc_in_another_process_during_a_slow_log_frees_none_of_its_blobs(
        store: Store, data_dir: Path, tmp_path: Path, list_blobs) -> None:
    proc, _ready, go = start_paused_log(Path(store.root), data_dir, tmp_path, "pause")
    try:
        written = files_on_disk(store.root)
        assert written, "the log wrote no blob before its commit"
        report = store.gc()
        assert report.blobs_freed == 0 and report.packs_removed == 0 and files_on_disk(store.root) == written
    finally:
        go.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "v0"
    store.artifact("slow:v0").verify()


def test_a_log_killed_between_its_blob_writes_and_its_commit_leaves_garbage_gc_frees_at_once(
        store: Store, data_dir: Path, tmp_path: Path, list_blobs) -> None:
    proc, _ready, _go = start_paused_log(Path(store.root), data_dir, tmp_path, "kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert files_on_disk(store.root), "the killed log wrote no blob"
    report = store.gc()  # defaults: no grace period to wait out
    assert report.blobs_freed + report.packs_removed > 0 and files_on_disk(store.root) == set()
    assert os.listdir(os.path.join(store.root, "leases")) == []  # the dead lease went too
    assert store.fsck().ok and store.artifacts() == []


def test_gc_that_cannot_read_a_live_lease_frees_nothing(store: Store, data_dir: Path, tmp_path: Path,
                                                        list_blobs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's lease it may not read: gc cannot know what that log holds, so it stops."""
    import artifactfs.leases as leases_mod

    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    store.delete("ds:v0")
    before = set(list_blobs(store.root))
    with leases_mod.Lease(os.path.join(store.root, "leases")) as lease:
        real_open = os.open

        def refuse(path, flags, *a, **k):  # as os.open of a 0600 lease of another user would
            if str(path) == lease.path and not flags & os.O_WRONLY:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(leases_mod.os, "open", refuse)
        with pytest.raises(ArtifactFSError, match="gc frees nothing"):
            store.gc()
    assert set(list_blobs(store.root)) == before
