"""Pack files (blobs/packs.py): small blobs in packs, large ones loose; dedup across both; what
gc, repack, fsck and reads do with packs, through the API, the view and a real mount."""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from fusehelpers import Mounter, mounter  # noqa: F401
from helpers import StoredBlob, b3, log_files, make_old_catalog, stored_blobs
from mountchurn import Readers, read_range

from artifactfs import NotFound, Store, ingest
from artifactfs.blobs import packs
from artifactfs.blobs.packs import HEADER, PACK_MAX
from artifactfs.fuse.view import VFS, BlobFile

rng_bytes = random.Random(11).randbytes


def open_packs(root: str) -> list[str]:
    """The pack files of the store at `root` this process has open (other tests' stores may
    still hold theirs)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used
        if target.startswith(f"{root}/") and target.removesuffix(" (deleted)").endswith(".pack"):
            found.append(target)
    return found


def pack_files(root: str | os.PathLike[str]) -> list[Path]:
    return sorted((Path(root) / "blobs" / "packs").glob("*.pack"))


def test_small_blobs_are_packed_and_large_ones_stay_files_of_their_own(store: Store, tmp_path: Path) -> None:
    files = {"small.txt": b"small\n", "edge.bin": rng_bytes(PACK_MAX - 1), "large.bin": rng_bytes(PACK_MAX)}
    v = log_files(store, "ds", files)
    blobs = stored_blobs(store.root)
    assert blobs[b3(files["small.txt"])].packed and blobs[b3(files["edge.bin"])].packed
    assert not blobs[b3(files["large.bin"])].packed and blobs[b3(files["large.bin"])].path.exists()
    [pack] = pack_files(store.root)
    assert pack.read_bytes()[:len(HEADER)] == HEADER
    assert pack.stat().st_size == len(HEADER) + len(files["small.txt"]) + len(files["edge.bin"])
    out = Path(v.download(root=str(tmp_path / "out")))
    assert {p: (out / p).read_bytes() for p in files} == files
    v.verify()
    assert store.fsck().ok


def test_content_stored_anywhere_is_not_written_again(store: Store) -> None:
    shared = {"a.txt": b"in a pack\n", "big.bin": rng_bytes(PACK_MAX + 10)}
    log_files(store, "one", {**shared, "twice/x": b"same", "twice/y": b"same"})
    sizes = [p.stat().st_size for p in pack_files(store.root)]
    assert sizes == [len(HEADER) + len(b"in a pack\n") + len(b"same")]  # one copy of "same"
    log_files(store, "two", {"copy-of-a": b"in a pack\n", "copy-of-big": shared["big.bin"], "new": b"new"})
    packs = pack_files(store.root)
    assert len(packs) == 2 and sorted(p.stat().st_size for p in packs) == sorted([sizes[0], len(HEADER) + 3])
    assert len([b for b in stored_blobs(store.root).values() if not b.packed]) == 1


def test_a_batch_of_small_files_writes_only_what_no_pack_and_no_loose_blob_holds(store: Store, tmp_path: Path) -> None:
    log_files(store, "old", {"packed": b"already packed"})
    loose = store.blobs.put_bytes(b"already loose" * 100_000)  # >= PACK_MAX: a file of its own
    contents = [b"new", b"already packed", b"new", b"already loose" * 100_000, b"newer"]
    srcs = []
    for i, data in enumerate(contents):
        srcs.append(str(tmp_path / f"f{i}"))
        Path(srcs[-1]).write_bytes(data)
    lease = Recorder()
    got = store.blobs.put_files_stat(srcs, lease=lease)
    assert [r.oid for r, _, _ in got] == [b3(d) for d in contents]
    assert [r.written for r, _, _ in got] == [True, False, False, False, True]
    [new] = store.blobs.take_packs(lease)
    # What it reuses is held, and its new pack's name; its own blobs wait for the commit
    assert set(lease.held) == {b3(b"already packed"), loose.oid, packs.pack_hold(new.name)}
    assert sorted(o for o, _, _ in new.blobs) == sorted([b3(b"new"), b3(b"newer")])
    assert new.size == len(HEADER) + len(b"new") + len(b"newer")


class Recorder:
    """A lease that remembers what it was told to hold."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def hold(self, oid: str) -> None:
        self.held.append(oid)

    def hold_many(self, oids: Iterable[str]) -> None:
        self.held.extend(oids)


def test_a_pack_that_cannot_be_made_durable_fails_the_log_and_leaves_no_pack(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "PACK_TARGET", 20_000)  # full packs are synced in the background
    monkeypatch.setattr(ingest, "BATCH_FILES", 4)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        log_files(store, "ds", {f"f{i}": rng_bytes(3000) for i in range(100)})
    assert e.value.errno == errno.EIO
    assert open_packs(store.root) == []
    assert pack_files(store.root) == [] and store.catalog.pack_list() == []
    with pytest.raises(NotFound):
        store.artifact("ds:latest")


def test_a_log_that_fills_many_packs_records_every_one_and_writes_each_blob_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "PACK_TARGET", 20_000)  # a pack per few files (threads write at once)
    monkeypatch.setattr(ingest, "BATCH_FILES", 4)  # a batch goes into one pack
    files = {f"d{i % 7}/f{i}": rng_bytes(1000 + 37 * i) for i in range(300)}
    v = log_files(store, "ds", files)
    assert open_packs(store.root) == []  # every pack written was closed (the catalog's files open lazily: not counted)
    on_disk = pack_files(store.root)
    assert len(on_disk) > 10
    assert sum(p.stat().st_size for p in on_disk) == len(HEADER) * len(on_disk) + sum(map(len, files.values()))
    assert {p.name for p in store.catalog.pack_list()} == {p.stem for p in on_disk}
    assert all(b.packed for b in stored_blobs(store.root).values())
    v.verify()
    assert store.fsck().ok


def test_a_log_that_fails_leaves_no_pack(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object, **k: object) -> None:
        raise OSError(5, "the disk failed")

    monkeypatch.setattr(store.blobs, "sync", fail)
    with pytest.raises(OSError):
        log_files(store, "ds", {"a": b"a", "b": b"b"})
    assert pack_files(store.root) == [] and store.artifacts() == []


def test_two_logs_in_threads_of_one_store_keep_their_packs_apart(store: Store) -> None:
    errors: list[BaseException] = []

    def log(name: str) -> None:
        try:
            log_files(store, name, {f"f{i}": f"{name} {i}\n".encode() * 50 for i in range(200)})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=log, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(pack_files(store.root)) == 2
    for name in ("left", "right"):
        store.artifact(name).verify()
    assert store.fsck().ok


def test_gc_drops_dead_blobs_removes_empty_packs_and_repacks_sparse_ones(store: Store, tmp_path: Path) -> None:
    keep = {f"k{i}": rng_bytes(1000) for i in range(5)}
    log_files(store, "mixed", {**keep, **{f"j{i}": rng_bytes(4000) for i in range(5)}})  # 1/5 live later
    log_files(store, "junk", {f"x{i}": rng_bytes(1000) for i in range(3)})
    log_files(store, "kept", keep)  # the same bytes: no new pack
    assert len(pack_files(store.root)) == 2
    store.delete("mixed:v0")
    store.delete("junk:v0")
    report = store.gc()
    assert report.blobs_freed == 8 and report.bytes_freed == 5 * 4000 + 3 * 1000
    assert report.packs_removed == 1  # junk's: nothing live in it
    assert report.repack is not None and report.repack.blobs_moved == 5 and report.repack.packs_removed == 1
    [pack] = pack_files(store.root)
    assert pack.stat().st_size == len(HEADER) + 5000  # only what is live was copied
    out = Path(store.artifact("kept").download(root=str(tmp_path / "out")))
    assert {p: (out / p).read_bytes() for p in keep} == keep
    assert store.fsck().ok and store.gc().repack == store.gc().repack  # nothing more to do


def test_gc_dry_run_changes_no_pack(store: Store) -> None:
    log_files(store, "ds", {"a": b"only in v0"})
    log_files(store, "ds", {"b": b"only in v1"})
    store.delete("ds:v0")
    before = {p: p.read_bytes() for p in pack_files(store.root)}
    r = store.gc(dry_run=True)
    assert (r.blobs_freed, r.packs_removed, r.repack) == (1, 1, None)
    assert {p: p.read_bytes() for p in pack_files(store.root)} == before
    assert store.artifact("ds:v1").get_path("b").blob in stored_blobs(store.root)


def test_repack_packs_the_small_loose_blobs_of_an_old_store(store_root: Path, tmp_path: Path) -> None:
    files = {f"f{i}": rng_bytes(100 + i) for i in range(20)} | {"big": rng_bytes(PACK_MAX + 1)}
    s = Store(store_root)
    log_files(s, "ds", files)
    s.close()
    make_old_catalog(store_root, 4)  # as a store logged before pack files: every blob loose
    s = Store(store_root)
    try:
        r = s.repack()
        assert (r.blobs_moved, r.loose_removed, r.packs_written) == (20, 20, 1)
        blobs = stored_blobs(store_root)
        assert all(blobs[b3(d)].packed for p, d in files.items() if p != "big")
        assert not blobs[b3(files["big"])].packed
        out = Path(s.artifact("ds").download(root=str(tmp_path / "out")))
        assert {p: (out / p).read_bytes() for p in files} == files
        assert s.fsck().ok
        assert s.repack().blobs_moved == 0
    finally:
        s.close()


def test_repack_leaves_a_corrupt_blob_where_it_is_and_names_it(store: Store) -> None:
    log_files(store, "ds", {"good": b"good bytes", "bad": b"bad bytes!"})
    StoredBlob(store.root, b3(b"bad bytes!")).write_bytes(b"BAD")
    r = store.repack(below=2)  # above 1: every pack counts as sparse
    assert r.corrupt == [b3(b"bad bytes!")] and r.blobs_moved == 1 and r.packs_removed == 0
    assert b3(b"bad bytes!") in store.blobs.suspects()


def test_fsck_finds_a_corrupt_packed_blob_and_repair_moves_it_aside(store: Store) -> None:
    log_files(store, "ds", {"a": b"kept bytes", "b": b"rotting bytes"})
    oid = b3(b"rotting bytes")
    StoredBlob(store.root, oid).write_bytes(b"ROT")
    report = store.fsck()
    assert report.corrupt == {oid: ["ds:v0"]}
    report = store.fsck(repair=True)
    assert report.quarantined == [oid]
    assert (Path(store.root) / "quarantine" / oid).read_bytes() == b"ROTting bytes"
    assert not StoredBlob(store.root, oid).exists()
    log_files(store, "again", {"b": b"rotting bytes"})  # a log of the same bytes restores it
    assert store.fsck().ok
    store.artifact("ds:v0").verify()


def test_fsck_finds_a_packed_blob_cut_off_by_a_truncated_pack(store: Store) -> None:
    log_files(store, "ds", {"a": b"one in the pack", "b": b"another in the pack"})
    # ingest threads choose the order in the pack: cut into whichever blob came last
    blobs = [StoredBlob(store.root, b3(data)) for data in (b"one in the pack", b"another in the pack")]
    last = max(blobs, key=lambda b: b.location()[1])  # type: ignore[index]
    last.truncate(3)
    report = store.fsck()
    assert report.missing == {last.oid: ["ds:v0"]} and not report.corrupt


# -- the view: a node carries its blob's location, and follows a repack ------------------------


def test_a_node_opens_its_packed_blob_without_asking_the_catalog(store: Store) -> None:
    log_files(store, "ds", {"a.txt": b"alpha"})
    v = VFS(store.catalog, store.blobs)
    v.apply_snapshot(store.catalog.snapshot())
    node = v.lookup(v.lookup(v.lookup(1, b"ds").ino, b"v0").ino, b"a.txt")
    assert isinstance(node, BlobFile) and node.at is not None and node.at.offset == len(HEADER)

    def no_lookup(oid: str) -> None:
        raise AssertionError("the catalog was asked")

    store.blobs.locate = no_lookup  # type: ignore[method-assign]  # the read path must not need it
    h = v.open(node, may_hash=False)
    try:
        buf = bytearray(10)
        assert bytes(buf[:h.reader.readinto(memoryview(buf), 0)]) == b"alpha"
    finally:
        h.close()


def test_a_node_whose_pack_was_repacked_away_finds_its_blob_again(store: Store) -> None:
    log_files(store, "ds", {"a.txt": b"alpha", "b.txt": b"bravo"})
    v = VFS(store.catalog, store.blobs)
    v.apply_snapshot(store.catalog.snapshot())
    node = v.lookup(v.lookup(v.lookup(1, b"ds").ino, b"v0").ino, b"b.txt")
    before = node.at
    assert store.repack(below=2).packs_removed == 1
    store.blobs.forget_packs()  # what a mount does when it sees the catalog change
    h = v.open(node, may_hash=False)
    try:
        assert h.reader.read_all() == b"bravo"
    finally:
        h.close()
    assert node.at is not None and before is not None and node.at.pack != before.pack


# -- a real mount -------------------------------------------------------------------------------


@pytest.mark.fuse
def test_sixteen_readers_read_every_byte_right_during_repeated_repacks(store: Store, mounter: Mounter) -> None:
    rng = random.Random(5)
    files = {f"d{i % 4}/f{i:03}.bin": rng.randbytes(rng.randint(1, 64 << 10)) for i in range(120)}
    log_files(store, "ds", files)
    m = mounter.start(store.root)
    names = sorted(files)
    mismatches: list[str] = []
    reads = [0]

    def one_read(r: random.Random) -> None:
        name = r.choice(names)
        data = files[name]
        off = r.randrange(len(data))
        n = r.randint(1, 70 << 10)
        got = read_range(m.path / "ds" / "v0" / name, off, n, uncached=r.random() < 0.5)
        reads[0] += 1
        if got != data[off:off + n]:
            mismatches.append(f"{name} at {off}+{n}: {len(got)} bytes, not the logged ones")

    repacks = [0]
    stop = threading.Event()

    def repack_loop() -> None:
        s = Store(store.root)
        try:
            while not stop.is_set():
                r = s.repack(below=2)  # every pack, every time
                assert r.packs_removed >= 1 and not r.corrupt
                repacks[0] += 1
        finally:
            s.close()

    t = threading.Thread(target=repack_loop)
    t.start()
    try:
        readers = Readers(16, 6.0, one_read)
        readers.run()
    finally:
        stop.set()
        t.join(60)
    assert not readers.errors, f"{len(readers.errors)} reader errors; first:\n{readers.errors[0]}"
    assert not mismatches, mismatches[:5]
    assert repacks[0] >= 5 and reads[0] > 1000, (repacks[0], reads[0])
    assert len(pack_files(store.root)) == 1
    assert store.fsck().ok
