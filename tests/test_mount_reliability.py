"""Reliability through a real mount: readers keep getting exactly the logged bytes while
versions are logged, deleted and collected, and `--verify-reads` refuses corrupt blobs.

Every test mounts with the installed `artifactfs` command (the `mounter` fixture unmounts and
stops the daemon in teardown, and fails a test whose daemon logged a traceback).
"""

from __future__ import annotations

import errno
import math
import os
import random
import threading
import time
from pathlib import Path

import pytest
from fusehelpers import Mounter, mounter, wait_until  # noqa: F401
from helpers import StoredBlob
from mountchurn import Churner, Readers, log_files, read_range

from artifactfs import Artifact, Store
from artifactfs.refs.file import file_uri

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def blob_path(store: Store, spec: str, entry: str) -> StoredBlob:
    blob = store.artifact(spec).get_path(entry).blob
    assert blob is not None
    return StoredBlob(store.root, blob)


# -- an open file outlives its version ----------------------------------------------------------


def test_open_file_reads_exact_bytes_after_its_version_is_deleted_and_collected(store: Store,
                                                                              mounter: Mounter) -> None:
    rng = random.Random(1)
    data = rng.randbytes(8 * MiB)  # unique content: its blob belongs to v0 alone
    log_files(store, "ds", {"big.bin": data, "small.txt": b"small\n"})
    log_files(store, "ds", {"other.bin": rng.randbytes(4096)})
    blob = blob_path(store, "ds:v0", "big.bin")
    m = mounter.start(store.root)
    with open(m.path / "ds/v0/big.bin", "rb", buffering=0) as f:
        assert f.read(4096) == data[:4096]

        store.delete("ds:v0")
        report = store.gc(grace_seconds=0)
        assert blob.name in report.freed and not blob.exists()
        assert wait_until(lambda: not os.path.exists(m.path / "ds/v0"), 3.0), "the daemon did not drop v0"

        # A range never read before (past any read-ahead), then everything again with the page
        # cache dropped, so each byte comes from the daemon's descriptor of the collected blob.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(f.fileno(), MiB, 6 * MiB + 12345) == data[6 * MiB + 12345:7 * MiB + 12345]
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(0)
        assert f.read() == data


def test_open_file_of_a_single_version_mount_reads_after_the_version_is_deleted_and_collected(
        store: Store, mounter: Mounter) -> None:
    rng = random.Random(7)
    data = rng.randbytes(3 * MiB)
    log_files(store, "ds", {"big.bin": data})
    log_files(store, "ds", {"other.bin": b"other"})
    blob = blob_path(store, "ds:v0", "big.bin")
    m = mounter.start(store.root, "--artifact", "ds:v0")
    with open(m.path / "big.bin", "rb", buffering=0) as f:  # opened, nothing read yet
        store.delete("ds:v0")
        report = store.gc(grace_seconds=0)  # waits for the daemon to hold the file
        assert blob.name in report.freed and report.mounts_behind == []
        assert not blob.exists()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == data
    assert wait_until(lambda: not os.path.exists(m.path / "big.bin"), 3.0)


def test_files_are_opened_without_a_request_to_the_daemon(store: Store, mounter: Mounter) -> None:
    """The daemon answers the first OPEN with ENOSYS; after that the kernel opens files by
    itself (no OPEN, FLUSH or RELEASE per file) and keeps their pages across opens."""
    files = {f"f{i:03}.txt": b"file %d\n" % i for i in range(100)}
    log_files(store, "ds", files)
    m = mounter.start(store.root, "--debug")
    for _ in range(3):
        for name, data in files.items():
            with open(m.path / "ds/v0" / name, "rb") as f:
                assert f.read() == data
    text = m.log_text()
    assert text.count("-> open(") == 1, text.count("-> open(")
    assert "errno 38" in text  # ENOSYS
    assert "-> release(" not in text and "-> flush(" not in text
    assert text.count("read(fh ") == len(files)  # each file's bytes fetched once, then cached


def test_file_not_yet_opened_in_a_deleted_and_collected_version_is_gone_not_damaged(
        store: Store, mounter: Mounter) -> None:
    """A reader holding a directory of a version (its working directory, a dataset root) may open
    the next file after the version was deleted and collected. The entry is gone: that is
    ENOENT, not EIO, and not an error telling the operator to fsck an intact store."""
    rng = random.Random(6)
    log_files(store, "ds", {"a/x.bin": rng.randbytes(5000), "a/y.bin": rng.randbytes(5000)})
    log_files(store, "ds", {"other.bin": b"other"})
    m = mounter.start(store.root)
    dfd = os.open(m.path / "ds/v0/a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.stat("x.bin", dir_fd=dfd)  # the kernel now knows the name (long entry timeout)
        store.delete("ds:v0")
        store.gc(grace_seconds=0)
        assert wait_until(lambda: not os.path.exists(m.path / "ds/v0"), 3.0), "the daemon did not drop v0"
        for name in ("x.bin", "y.bin"):
            with pytest.raises(OSError) as ei:
                os.close(os.open(name, os.O_RDONLY, dir_fd=dfd))
            assert ei.value.errno in (errno.ENOENT, errno.ESTALE), (name, ei.value)
    finally:
        os.close(dfd)
    assert "fsck" not in m.log_text(), m.log_text()


def test_reader_of_one_version_gets_exact_bytes_while_others_are_logged_deleted_and_collected(
        store: Store, mounter: Mounter) -> None:
    rng = random.Random(2)
    files = {f"d{i % 3}/f{i:02d}.bin": rng.randbytes(rng.randint(1, 512 * 1024)) for i in range(30)}
    log_files(store, "ds", files)
    m = mounter.start(store.root)
    root = m.path / "ds/v0"
    names = sorted(files)
    reads = [0]
    lock = threading.Lock()

    def read_all(r: random.Random) -> None:
        for rel in r.sample(names, len(names)):
            got = read_range(root / rel, 0, len(files[rel]) + 1, uncached=True)
            assert got == files[rel], f"{rel}: {len(got)} bytes differ from the logged {len(files[rel])}"
            with lock:
                reads[0] += 1
        assert sorted(os.listdir(root)) == ["d0", "d1", "d2"]

    # Later versions share some of v0's blobs (gc must keep those) and hold fresh ones (gc frees them).
    churn = Churner(str(store.root), "ds", protect={"ds:v0"}, shared={k.replace("/", "_"): v for k, v in files.items()},
                    period=0.2, keep=1)
    churn.start()
    try:
        readers = Readers(4, 8.0, read_all)
        readers.run()
    finally:
        churn.stop()
        churn.join(timeout=60)
    assert not churn.stats.errors, churn.stats.errors[0]
    assert not readers.errors, f"{len(readers.errors)} reader errors; first:\n{readers.errors[0]}"
    assert churn.stats.logged >= 3 and churn.stats.deleted >= 1 and churn.stats.blobs_freed >= 1, churn.stats
    assert reads[0] > len(names)


# -- --verify-reads ---------------------------------------------------------------------------


def corrupt(blob: StoredBlob, offset: int = 100) -> bytes:
    """Flip bytes of a blob in place, keeping its size (as bit rot or a stray write would)."""
    data = bytearray(blob.read_bytes())
    data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])
    blob.write_bytes(bytes(data))
    return blob.read_bytes()


@pytest.fixture
def corrupt_store(store: Store) -> tuple[Store, dict[str, bytes], bytes]:
    rng = random.Random(3)
    files = {"bad.bin": rng.randbytes(256 * 1024), "good.bin": rng.randbytes(256 * 1024)}
    log_files(store, "ds", files)
    size = len(files["bad.bin"])
    corrupted = corrupt(blob_path(store, "ds:v0", "bad.bin"))
    assert len(corrupted) == size and corrupted != files["bad.bin"]
    return store, files, corrupted


def test_verify_reads_refuses_a_corrupt_blob_with_eio_and_logs_its_name(
        corrupt_store: tuple[Store, dict[str, bytes], bytes], mounter: Mounter) -> None:
    store, files, _ = corrupt_store
    m = mounter.start(store.root, "--verify-reads")
    for _ in range(2):  # refused at every open, not only the first
        with pytest.raises(OSError) as ei:
            (m.path / "ds/v0/bad.bin").read_bytes()
        assert ei.value.errno == errno.EIO
    assert "ds:v0/bad.bin" in m.log_text()
    assert (m.path / "ds/v0/good.bin").read_bytes() == files["good.bin"]


def test_without_verify_reads_a_corrupt_blob_is_served_as_it_is_on_disk(
        corrupt_store: tuple[Store, dict[str, bytes], bytes], mounter: Mounter) -> None:
    """The reason `--verify-reads` exists: by default the read path does no hashing (a read is a
    lookup and a pread), so a blob damaged on disk after it was logged is handed out as it is.
    Only `fsck`, or a mount with `--verify-reads`, notices."""
    store, files, corrupted = corrupt_store
    m = mounter.start(store.root)
    assert (m.path / "ds/v0/bad.bin").read_bytes() == corrupted != files["bad.bin"]
    assert (m.path / "ds/v0/good.bin").read_bytes() == files["good.bin"]


def test_verify_reads_checks_the_stored_copy_served_for_a_changed_reference(
        store: Store, tmp_path: Path, mounter: Mounter) -> None:
    """A changed checksummed reference falls back to the store's blob of its logged content;
    that blob goes through the same check."""
    content = random.Random(4).randbytes(64 * 1024)
    ref = tmp_path / "refdata" / "r.bin"
    ref.parent.mkdir()
    ref.write_bytes(content)
    art = Artifact("refs", type="dataset")
    art.add_reference(file_uri(str(ref)), checksum=True)
    store.log_artifact(art)
    log_files(store, "copy", {"r.bin": content})  # the store holds the logged bytes too
    corrupt(blob_path(store, "copy:v0", "r.bin"))
    ref.write_bytes(bytes(b ^ 1 for b in content))  # the reference changes: same size, other bytes
    m = mounter.start(store.root, "--verify-reads")
    with pytest.raises(OSError) as ei:
        (m.path / "refs/v0/r.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    assert "refs:v0/r.bin" in m.log_text()


# -- load ---------------------------------------------------------------------------------------

LOAD_SECONDS = 60.0
LOAD_THREADS = 16


def load_files(seed: int) -> dict[str, bytes]:
    """~200 files of 4 KiB to 2 MiB (log-uniform) and two of 32 MiB."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(200):
        size = int(math.exp(rng.uniform(math.log(4096), math.log(2 * MiB))))
        files[f"d{i % 10}/f{i:03d}.bin"] = rng.randbytes(size)
    for i in range(2):
        files[f"big/{i}.bin"] = rng.randbytes(32 * MiB)
    return files


def test_sixteen_threads_read_exact_random_ranges_for_a_minute_while_versions_churn(
        store: Store, mounter: Mounter) -> None:
    files = load_files(seed=5)
    log_files(store, "load", files)
    m = mounter.start(store.root)
    root = m.path / "load/v0"
    names = sorted(files)
    lock = threading.Lock()
    counts = {"reads": 0, "bytes": 0, "uncached": 0, "mmap": 0}
    mismatches: list[str] = []

    def one_read(rng: random.Random) -> None:
        rel = rng.choice(names)
        data = files[rel]
        if rng.random() < 0.05:
            off, n = 0, len(data) + 1  # the whole file, and a read past its end
        else:
            off = rng.randrange(len(data))
            n = rng.randint(1, min(MiB, len(data) - off))
        uncached = rng.random() < 0.5
        use_mmap = rng.random() < 0.1
        got = read_range(root / rel, off, n, uncached=uncached, use_mmap=use_mmap)
        want = data[off:off + n]
        with lock:
            counts["reads"] += 1
            counts["bytes"] += len(got)
            counts["uncached"] += uncached
            counts["mmap"] += use_mmap
            if got != want:
                mismatches.append(f"{rel} off {off} n {n}: got {len(got)} bytes, "
                                  f"first difference at {next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))}")

    small = {k.replace("/", "_"): v for k, v in files.items() if len(v) <= 256 * 1024}
    churn = Churner(str(store.root), "load", protect={"load:v0"}, shared=small, period=2.0, keep=2)
    t0 = time.monotonic()
    churn.start()
    try:
        readers = Readers(LOAD_THREADS, LOAD_SECONDS, one_read, seed=99)
        readers.run()
    finally:
        churn.stop()
        churn.join(timeout=60)
    elapsed = time.monotonic() - t0
    print(f"\nload: {LOAD_THREADS} threads for {elapsed:.1f} s: {counts['reads']} reads "
          f"({counts['uncached']} with the page cache dropped, {counts['mmap']} through mmap), "
          f"{counts['bytes']} bytes ({counts['bytes'] / MiB:.0f} MiB) checked; churn: "
          f"{churn.stats.logged} versions logged, {churn.stats.deleted} deleted, {churn.stats.gc_runs} gc runs "
          f"freeing {churn.stats.blobs_freed} blobs; {len(mismatches)} mismatches, {len(readers.errors)} errors")
    assert not readers.errors, f"{len(readers.errors)} reader errors; first:\n{readers.errors[0]}"
    assert not mismatches, f"{len(mismatches)} mismatches; first: {mismatches[:5]}"
    assert not churn.stats.errors, churn.stats.errors[0]
    assert churn.stats.logged >= 5 and churn.stats.deleted >= 1 and churn.stats.blobs_freed >= 1, churn.stats
    assert counts["reads"] >= 1000
