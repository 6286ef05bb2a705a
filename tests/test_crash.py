"""Crash consistency: a process killed with SIGKILL at any moment of a change leaves the store
whole: all of the change or none of it, fsck clean (unreferenced blobs are garbage, not damage),
temp files that the next gc removes, and the same change succeeding afterwards.

Each moment runs the change in a child process that patches itself (never production code) and
SIGKILLs itself at the k-th call of a blob-store or catalog operation. The parent then inspects
copies of the killed store, so every check below starts from the same crash.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifactfs import Artifact, NotFound, Store

# -- the changes a child makes (also run in-process for the expected end state) ------------------
# These functions are copied into the child's script with inspect.getsource: keep them
# self-contained (only os, urllib.parse, Artifact and Store).


def build_v0(src: str, name: str = "ds") -> Artifact:
    art = Artifact(name, type="dataset")
    art.add_dir(os.path.join(src, "v0"))
    return art


def build_v1(src: str, name: str = "ds") -> Artifact:
    """New small blobs, a dedup hit, two equal new files, a >8 MiB file (the streamed put), a
    new_file, a checksummed file:// reference and a tracked reference."""
    art = Artifact(name, type="dataset")
    art.add_dir(os.path.join(src, "v1"))
    with art.new_file("notes.txt") as f:
        f.write("written through new_file\n")
    art.add_reference("file://" + urllib.parse.quote(os.path.join(src, "refd", "ref.txt")), name="refd/ref.txt")
    art.add_reference("s3://bucket/model.bin", checksum=False)
    return art


def op_log(store: Store, src: str, arm) -> None:
    art = build_v1(src)
    arm()
    store.log_artifact(art, aliases=["best", "prod"])


def op_log_new(store: Store, src: str, arm) -> None:
    art = build_v1(src, "other")
    arm()
    store.log_artifact(art)


def op_relog_same(store: Store, src: str, arm) -> None:
    art = build_v0(src)
    arm()
    store.log_artifact(art, aliases=["prod"])


def op_set_alias(store: Store, src: str, arm) -> None:
    arm()
    store.set_alias("ds:v1", "best")


def op_remove_alias(store: Store, src: str, arm) -> None:
    arm()
    store.remove_alias("ds", "best")


def op_delete(store: Store, src: str, arm) -> None:
    arm()
    store.delete("ds:v1")


def op_gc(store: Store, src: str, arm) -> None:
    arm()
    store.gc(grace_seconds=0)


OPS: dict[str, Callable[[Store, str, Callable[[], None]], None]] = {
    "log": op_log, "log_batched": op_log, "log_new": op_log_new, "relog_same": op_relog_same, "set_alias": op_set_alias,
    "remove_alias": op_remove_alias, "delete": op_delete, "gc": op_gc,
}

# The store each change starts from:
#   v0      ds:v0 (aliases best, latest)
#   v0v1    ds:v0 (best), ds:v1 (latest), both from build_v0/build_v1
#   garbage v0v1 with ds:v0 deleted (its own blobs are garbage) and a stale temp file
SETUP = {"log": "v0", "log_batched": "v0", "log_new": "v0", "relog_same": "v0", "set_alias": "v0v1", "remove_alias": "v0v1",
         "delete": "v0v1", "gc": "garbage"}

# -- the child -------------------------------------------------------------------------------------

CHILD_MAIN = r'''
cfg = json.loads(sys.argv[1])
import artifactfs.blobs.local
import artifactfs.ingest
from artifactfs.blobs.local import LocalBlobs

artifactfs.ingest.default_workers = lambda: 1  # one ingest thread: the k-th call is the same each run
if cfg["op"] != "log_batched":
    artifactfs.ingest.BATCH_FILES = 1  # a write per small blob: a moment can name the k-th


class Trap:
    def __init__(self, kind, when, k, target=""):
        self.kind, self.when, self.k, self.target = kind, when, k, target
        self.count = 0
        self.armed = False

    def hit(self, kind, when, what=""):
        if self.armed and kind == self.kind and when == self.when and what.startswith(self.target):
            self.count += 1
            if self.count == self.k:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)


trap = Trap(**cfg["trap"])

# The catalog's statements: a connection class whose execute/executemany report to the trap.
_connect = sqlite3.connect


class TrappedConnection(sqlite3.Connection):
    def execute(self, sql, *args):
        trap.hit("sql", "before", sql.strip())
        cur = super().execute(sql, *args)
        trap.hit("sql", "after", sql.strip())
        return cur

    def executemany(self, sql, *args):
        trap.hit("sql", "before", sql.strip())
        cur = super().executemany(sql, *args)
        trap.hit("sql", "after", sql.strip())
        return cur


def connect(*args, **kwargs):
    kwargs["factory"] = TrappedConnection
    return _connect(*args, **kwargs)


sqlite3.connect = connect

# File operations on blob temp files and pack files.
tmpdir = os.path.join(cfg["root"], "blobs", "tmp")
packdir = os.path.join(cfg["root"], "blobs", "packs")
tmp_fds, pack_fds, packdir_fds = set(), set(), set()
_open, _write, _pwrite, _pwritev, _fsync = os.open, os.write, os.pwrite, os.pwritev, os.fsync
_replace, _unlink = os.replace, os.unlink


def is_tmp(path):
    return isinstance(path, str) and path.startswith(tmpdir + os.sep)


def is_pack(path):
    return isinstance(path, str) and path.startswith(packdir + os.sep)


def open_(path, flags, mode=0o777, *, dir_fd=None):
    fd = _open(path, flags, mode, dir_fd=dir_fd)
    for s in (tmp_fds, pack_fds, packdir_fds):
        s.discard(fd)
    if is_tmp(path):
        tmp_fds.add(fd)
        trap.hit("open-tmp", "after")
    elif is_pack(path) and flags & os.O_CREAT:
        pack_fds.add(fd)
        trap.hit("open-pack", "after")
    elif path == packdir:
        packdir_fds.add(fd)
    return fd


def write_(fd, data):
    kind = "write-tmp" if fd in tmp_fds else "write-pack" if fd in pack_fds else None
    if kind:
        trap.hit(kind, "before")
    n = _write(fd, data)
    if kind:
        trap.hit(kind, "after")
    return n


def pwrite_(fd, data, offset, write=_pwrite):
    kind = "write-pack" if fd in pack_fds else None
    if kind:
        trap.hit(kind, "before")
    n = write(fd, data, offset)
    if kind:
        trap.hit(kind, "after")
    return n


def pwritev_(fd, bufs, offset):
    return pwrite_(fd, bufs, offset, _pwritev)


def fsync_(fd):
    kind = "fsync-pack" if fd in pack_fds else "fsync-packdir" if fd in packdir_fds else None
    if kind:
        trap.hit(kind, "before")
    _fsync(fd)
    if kind:
        trap.hit(kind, "after")


def replace_(src, dst, **kwargs):
    mine = is_tmp(src)
    if mine:
        trap.hit("rename-blob", "before")
    _replace(src, dst, **kwargs)
    if mine:
        trap.hit("rename-blob", "after")


def unlink_(path, **kwargs):
    kind = "unlink-tmp" if is_tmp(path) else "unlink-pack" if is_pack(path) else None
    if kind:
        trap.hit(kind, "before")
    _unlink(path, **kwargs)
    if kind:
        trap.hit(kind, "after")


os.open, os.write, os.pwrite, os.pwritev, os.fsync = open_, write_, pwrite_, pwritev_, fsync_
os.replace, os.unlink = replace_, unlink_


def wrap(owner, attr, kind):
    orig = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        trap.hit(kind, "before")
        result = orig(*args, **kwargs)
        trap.hit(kind, "after")
        return result

    setattr(owner, attr, wrapper)


wrap(LocalBlobs, "sync", "sync")
wrap(LocalBlobs, "remove_many", "remove-blob")
wrap(artifactfs.blobs.local, "copy_fd", "copy-large")


def arm():
    trap.armed = True


store = Store(cfg["root"])
OPS[cfg["op"]](store, cfg["src"], arm)
print("finished: the trap never fired", flush=True)
'''

CHILD = "\n".join([
    "import json, os, signal, sqlite3, sys, urllib.parse",
    "from artifactfs import Artifact, Store",
    *(inspect.getsource(f) for f in (build_v0, build_v1, *OPS.values())),
    "OPS = {" + ", ".join(f"{k!r}: {f.__name__}" for k, f in OPS.items()) + "}",
    CHILD_MAIN,
])

# -- the moments -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    id: str
    op: str
    kind: str            # what the trap counts (see Trap.hit calls in CHILD_MAIN)
    when: str = "after"  # kill before or after the call
    k: int = 1           # at the k-th matching call
    target: str = ""     # for "sql": the statement's prefix
    committed: bool = False  # True: the kill comes after COMMIT, so the change must be complete


MOMENTS = [
    # blob writes of a log. New small blobs go to one pack, in this order: a.txt, b.txt, c.txt,
    # dup1.txt, sub/d.txt, notes.txt; big.bin (9 MiB) is a loose blob (a temp file, renamed).
    Moment("log-pack-created", "log", "open-pack", k=1),
    Moment("log-pack-header-written", "log", "write-pack", k=1),
    Moment("log-pack-before-first-blob", "log", "write-pack", when="before", k=2),
    Moment("log-pack-blobs-written-3", "log", "write-pack", k=4),
    Moment("log-pack-all-blobs-written", "log", "write-pack", k=7),
    # ... and the same log as ingest batches it: the small blobs in one write
    Moment("log-batch-before-write", "log_batched", "write-pack", when="before", k=2),
    Moment("log-batch-written", "log_batched", "write-pack", k=2),
    Moment("log-batch-pack-fsynced", "log_batched", "fsync-pack", k=1),
    Moment("log-pack-fsync-before", "log", "fsync-pack", when="before", k=1),
    Moment("log-pack-fsynced", "log", "fsync-pack", k=1),
    Moment("log-pack-name-synced", "log", "fsync-packdir", k=1),
    Moment("log-blob-tmp-created-1", "log", "open-tmp", k=1),
    Moment("log-blob-rename-1-before", "log", "rename-blob", when="before", k=1),
    Moment("log-large-blob-copied", "log", "copy-large", k=1),
    Moment("log-large-blob-renamed", "log", "rename-blob", k=1),
    Moment("log-sync-before", "log", "sync", when="before"),
    Moment("log-sync-after", "log", "sync"),
    # the catalog transaction of a log
    Moment("log-txn-begun", "log", "sql", target="BEGIN IMMEDIATE"),
    Moment("log-txn-latest-read", "log", "sql", target="SELECT v.id, v.digest"),
    Moment("log-txn-pack-inserted", "log", "sql", target="INSERT INTO packs"),
    Moment("log-txn-locations-inserted", "log", "sql", target="INSERT OR IGNORE INTO packed"),
    Moment("log-txn-version-inserted", "log", "sql", target="INSERT INTO versions"),
    Moment("log-txn-next-index-bumped", "log", "sql", target="UPDATE artifacts"),
    Moment("log-txn-entries-inserted", "log", "sql", target="INSERT INTO entries"),
    Moment("log-txn-latest-moved", "log", "sql", target="INSERT INTO aliases", k=1),
    Moment("log-txn-best-moved", "log", "sql", target="INSERT INTO aliases", k=2),
    Moment("log-txn-prod-added", "log", "sql", target="INSERT INTO aliases", k=3),
    Moment("log-txn-generation-bumped", "log", "sql", target="UPDATE meta"),
    # The stat cache is host.db's, written after the catalog's COMMIT: a kill there loses only cache rows.
    Moment("log-stat-cache-written", "log", "sql", target="INSERT OR REPLACE INTO stat_cache", committed=True),
    Moment("log-txn-commit-before", "log", "sql", when="before", target="COMMIT"),
    Moment("log-txn-committed", "log", "sql", target="COMMIT", committed=True),
    # the first log of a new artifact
    Moment("new-artifact-row-inserted", "log_new", "sql", target="INSERT INTO artifacts"),
    Moment("new-artifact-commit-before", "log_new", "sql", when="before", target="COMMIT"),
    # a log identical to latest: only alias moves
    Moment("identical-relog-alias-added", "relog_same", "sql", target="INSERT INTO aliases"),
    Moment("identical-relog-commit-before", "relog_same", "sql", when="before", target="COMMIT"),
    # alias moves
    Moment("set-alias-moved", "set_alias", "sql", target="INSERT INTO aliases"),
    Moment("set-alias-committed", "set_alias", "sql", target="COMMIT", committed=True),
    Moment("remove-alias-deleted", "remove_alias", "sql", target="DELETE FROM aliases"),
    # delete
    Moment("delete-entries-gone", "delete", "sql", target="DELETE FROM entries"),
    Moment("delete-version-row-gone", "delete", "sql", target="DELETE FROM versions"),
    Moment("delete-latest-moved", "delete", "sql", target="INSERT INTO aliases"),
    Moment("delete-committed", "delete", "sql", target="COMMIT", committed=True),
    # gc
    Moment("gc-first-blobs-removed", "gc", "remove-blob", k=1),  # gc removes in batches
    Moment("gc-locations-dropped", "gc", "sql", target="DELETE FROM packed WHERE oid"),
    Moment("gc-temp-file-removed", "gc", "unlink-tmp", k=1),
    Moment("gc-commit-before", "gc", "sql", when="before", target="COMMIT"),
    # ... then gc repacks ds:v0's pack, which fell below half live (only shared.txt is)
    Moment("gc-repack-pack-created", "gc", "open-pack", k=1),
    Moment("gc-repack-blob-written", "gc", "write-pack", k=2),
    Moment("gc-repack-fsynced", "gc", "fsync-pack", k=1),
    Moment("gc-repack-moved", "gc", "sql", target="INSERT INTO packed"),
    Moment("gc-repack-commit-before", "gc", "sql", when="before", target="COMMIT", k=2),
    Moment("gc-repack-committed", "gc", "sql", target="COMMIT", k=2),
    Moment("gc-repack-old-pack-removed", "gc", "unlink-pack", k=1),
]

# -- fixtures and helpers ------------------------------------------------------------------------

rng_bytes = random.Random(1234).randbytes


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture(scope="module")
def crash_src(tmp_path_factory: pytest.TempPathFactory) -> str:
    src = tmp_path_factory.mktemp("crash-src")
    write_files(src / "v0", {"a.txt": b"alpha\n", "shared.txt": b"in v0 and v1\n", "old.txt": b"only in v0\n"})
    write_files(src / "v1", {
        "a.txt": b"alpha, second edition\n",
        "b.txt": b"bravo\n" * 100,
        "big.bin": rng_bytes(9 << 20),  # > SMALL_FILE: copied kernel-side, hashed afterwards
        "c.txt": b"charlie\n",
        "dup1.txt": b"the same new bytes twice\n",
        "shared.txt": b"in v0 and v1\n",
        "sub/d.txt": b"delta\n",
        "sub/dup2.txt": b"the same new bytes twice\n",
    })
    write_files(src / "refd", {"ref.txt": b"referenced in place\n"})
    return str(src)


def no_arm() -> None:
    pass


def make_base(root: Path, src: str, setup: str) -> None:
    s = Store(root)
    try:
        s.log_artifact(build_v0(src), aliases=["best"])
        if setup in ("v0v1", "garbage"):
            s.log_artifact(build_v1(src))
        if setup == "garbage":
            s.delete("ds:v0", delete_aliases=True)
            stale = root / "blobs" / "tmp" / "999999999-1-1.tmp"
            stale.write_bytes(b"left by a writer that died long ago")
            os.utime(stale, (time.time() - 7200, time.time() - 7200))
    finally:
        s.close()


def state_of(root: Path) -> dict[str, tuple[object, ...]]:
    """Every version's digest, aliases and entries (what a change may alter)."""
    s = Store(root)
    try:
        return {f"{name}:{v.version}": (v.digest, tuple(sorted(v.aliases)),
                                        tuple((e.path, e.digest, e.size, e.ref) for e in v.files()))
                for name in s.artifacts() for v in s.versions(name)}
    finally:
        s.close()


@dataclass(frozen=True)
class Killed:
    moment: Moment
    root: Path       # the store as the kill left it: copy it before use
    before: dict[str, tuple[object, ...]]
    after: dict[str, tuple[object, ...]]
    proc: subprocess.CompletedProcess[str]


def run_child(root: Path, src: str, op: str, trap: dict[str, object]) -> subprocess.CompletedProcess[str]:
    cfg = {"root": str(root), "src": src, "op": op, "trap": trap}
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module", params=MOMENTS, ids=lambda m: m.id)
def killed(request: pytest.FixtureRequest, crash_src: str, tmp_path_factory: pytest.TempPathFactory) -> Killed:
    m: Moment = request.param
    d = tmp_path_factory.mktemp(m.id)
    base = d / "base"
    make_base(base, crash_src, SETUP[m.op])
    before = state_of(base)
    # The end state of the same change, run to completion.
    shutil.copytree(base, d / "after")
    s = Store(d / "after")
    try:
        OPS[m.op](s, crash_src, no_arm)
    finally:
        s.close()
    after = state_of(d / "after")
    assert after != before or m.op == "gc", "the change must change something"
    shutil.copytree(base, d / "killed")
    proc = run_child(d / "killed", crash_src, m.op,
                     {"kind": m.kind, "when": m.when, "k": m.k, "target": m.target})
    return Killed(m, d / "killed", before, after, proc)


@pytest.fixture
def crashed(killed: Killed, tmp_path: Path) -> Path:
    """A private copy of the killed store."""
    dest = tmp_path / "crashed"
    shutil.copytree(killed.root, dest)
    return dest


def temp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "blobs" / "tmp"))


# -- checks after each kill ------------------------------------------------------------------------


def test_child_is_killed_at_the_chosen_moment(killed: Killed) -> None:
    p = killed.proc
    assert p.returncode == -signal.SIGKILL, (
        f"the child did not die at {killed.moment.id}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")


def test_catalog_shows_all_of_the_change_or_none_of_it(killed: Killed, crashed: Path) -> None:
    expected = killed.after if killed.moment.committed else killed.before
    assert state_of(crashed) == expected


def test_fsck_is_clean_after_the_kill(crashed: Path, open_store) -> None:
    report = open_store(crashed).fsck()
    assert report.ok, [str(d) for d in report.damage]


def test_every_version_verifies_after_the_kill(crashed: Path, open_store) -> None:
    s = open_store(crashed)
    for name in s.artifacts():
        for v in s.versions(name):
            assert v.file_count == len(v.manifest.entries)
            v.verify()


def test_gc_removes_temp_files_left_by_the_kill(crashed: Path, open_store) -> None:
    open_store(crashed).gc(grace_seconds=0)
    assert temp_files(crashed) == []


def test_gc_after_the_kill_removes_only_garbage(crashed: Path, open_store) -> None:
    s = open_store(crashed)
    s.gc(grace_seconds=0)
    report = s.fsck()
    assert report.ok, [str(d) for d in report.damage]
    assert report.garbage_blobs == 0 and report.garbage_bytes == 0  # no pack left that no row names
    assert [p.name for p in s.catalog.pack_list() if p.live == 0] == []


def test_same_change_succeeds_after_the_kill(killed: Killed, crashed: Path, crash_src: str, open_store) -> None:
    s = open_store(crashed)
    m = killed.moment
    try:
        OPS[m.op](s, crash_src, no_arm)
    except NotFound:
        # Deleting what the killed change already deleted: only after its COMMIT.
        assert m.committed and m.op in ("delete", "remove_alias")
    assert state_of(crashed) == killed.after
    for name in s.artifacts():
        for v in s.versions(name):
            v.verify()
    assert s.fsck().ok


# -- kills at random times -------------------------------------------------------------------------

TIMED_CHILD = r'''
import sys, time
from artifactfs import Artifact, Store
root, tree = sys.argv[1], sys.argv[2]
store = Store(root)
art = Artifact("tree", type="dataset")
art.add_dir(tree)
print("ready", flush=True)
t0 = time.monotonic()
store.log_artifact(art)
print(f"done {time.monotonic() - t0:.4f}", flush=True)
'''

N_TREE_FILES = 200
N_TIMED_KILLS = 10


def rewrite_tree(tree: Path, generation: int) -> None:
    """200 files whose bytes are new in each generation (nothing comes from the stat cache)."""
    for j in range(N_TREE_FILES):
        p = tree / f"d{j % 10}" / f"f{j:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"generation {generation} file {j}\n".encode() * (1 + j % 50))


def start_timed_child(root: Path, tree: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", TIMED_CHILD, str(root), str(tree)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"child failed before logging: {line}{p.communicate()[1]}")
    return p


def assert_store_whole(root: Path) -> None:
    s = Store(root)
    try:
        report = s.fsck()
        assert report.ok, [str(d) for d in report.damage]
        for name in s.artifacts():
            for v in s.versions(name):
                assert v.file_count == N_TREE_FILES == len(v.manifest.entries), v.qualified_name
                v.verify()
    finally:
        s.close()


def test_kills_at_random_times_during_a_200_file_log_leave_the_store_whole(tmp_path: Path) -> None:
    root, tree = tmp_path / "store", tmp_path / "tree"
    # Generations 0 and 1 run to the end: the faster of the two logs (the first one also
    # creates the catalog) sets the range of kill times.
    durations = []
    for gen in (0, 1):
        rewrite_tree(tree, gen)
        p = start_timed_child(root, tree)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        durations.append(float(out.split()[-1]))
    duration = min(durations)
    rng = random.Random(20240605)
    killed_mid_log = 0
    for gen in range(2, N_TIMED_KILLS + 2):
        rewrite_tree(tree, gen)
        p = start_timed_child(root, tree)
        time.sleep(rng.uniform(0, duration))
        p.kill()
        out, err = p.communicate(timeout=60)
        killed_mid_log += "done" not in out
        assert_store_whole(root)
    # Log times vary (syncfs of a shared disk): ask for a few kills mid-log, not most.
    assert killed_mid_log >= 3, f"too few kills landed mid-log: {killed_mid_log}, log durations {durations}"
    s = Store(root)
    try:
        s.gc(grace_seconds=0)
        assert temp_files(root) == []
        art = Artifact("tree", type="dataset")
        art.add_dir(tree)
        v = s.log_artifact(art)
        v.verify()
        assert s.fsck().ok
    finally:
        s.close()
