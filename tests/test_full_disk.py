"""ENOSPC: a log that does not fit gives one clear error, logs nothing, removes its temp files and
leaves the store usable. The store lives on a 2 MiB tmpfs mounted for each test (needs root)."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from artifactfs import Artifact, ArtifactFSError, Store, StoreFull

TMPFS_SIZE = 2 << 20


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MiB tmpfs at tmp_path/small, unmounted (lazily) at teardown even when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture
def small_store(small_fs: Path, open_store) -> Store:
    """A store on the tmpfs that already holds seed:v0 (so the catalog exists)."""
    s = open_store(small_fs / "store")
    art = Artifact("seed", type="dataset")
    with art.new_file("seed.txt") as f:
        f.write("seed\n")
    s.log_artifact(art)
    return s


def random_tree(root: Path, n: int, size: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"part{i:02d}.bin").write_bytes(rng.randbytes(size))
    return root


@pytest.fixture
def too_big_tree(tmp_path: Path) -> Path:
    """4 MiB of incompressible data in 512 KiB files: twice the tmpfs (small blob path)."""
    return random_tree(tmp_path / "too-big", 8, 512 << 10)


@pytest.fixture
def too_big_file(tmp_path: Path) -> Path:
    """One 9 MiB file: more than SMALL_FILE, so it takes the streamed (copy, then hash) path."""
    p = tmp_path / "huge.bin"
    p.write_bytes(random.Random(2).randbytes(9 << 20))
    return p


def temp_files(store: Store) -> list[str]:
    return os.listdir(store.blobs.tmpdir)


def log_dir(store: Store, name: str, src: Path):
    art = Artifact(name, type="dataset")
    art.add_dir(src)
    return store.log_artifact(art)


def log_small(store: Store, name: str = "small"):
    art = Artifact(name, type="dataset")
    with art.new_file("tiny.txt") as f:
        f.write("fits anywhere\n")
    return store.log_artifact(art)


def fill(fs: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = fs / "filler"
    chunk = b"\xa5" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    try:
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"x")
    except OSError as e:
        assert e.errno == errno.ENOSPC
    return filler


# -- blobs that do not fit ---------------------------------------------------------------------


def test_log_bigger_than_the_disk_raises_store_full(small_store: Store, too_big_tree: Path) -> None:
    with pytest.raises(StoreFull) as info:
        log_dir(small_store, "big", too_big_tree)
    assert isinstance(info.value, ArtifactFSError)
    assert "full" in str(info.value)


def test_log_bigger_than_the_disk_records_nothing(small_store: Store, too_big_tree: Path) -> None:
    with pytest.raises(ArtifactFSError):
        log_dir(small_store, "big", too_big_tree)
    assert small_store.artifacts() == ["seed"]


def test_log_bigger_than_the_disk_leaves_no_temp_files(small_store: Store, too_big_tree: Path) -> None:
    with pytest.raises(ArtifactFSError):
        log_dir(small_store, "big", too_big_tree)
    assert temp_files(small_store) == []


def test_store_takes_a_small_log_after_a_full_disk_log(small_store: Store, too_big_tree: Path) -> None:
    with pytest.raises(ArtifactFSError):
        log_dir(small_store, "big", too_big_tree)
    log_small(small_store).verify()
    assert small_store.fsck().ok


def test_gc_reclaims_the_blobs_of_a_full_disk_log(small_store: Store, small_fs: Path, too_big_tree: Path) -> None:
    free_before = os.statvfs(small_fs).f_bavail
    with pytest.raises(ArtifactFSError):
        log_dir(small_store, "big", too_big_tree)
    small_store.gc(grace_seconds=0)
    report = small_store.fsck()
    assert report.ok and report.garbage_blobs == 0
    assert os.statvfs(small_fs).f_bavail >= free_before - 4  # pages: only catalog growth is left


def test_large_file_bigger_than_the_disk_raises_store_full(small_store: Store, too_big_file: Path) -> None:
    art = Artifact("huge", type="model")
    art.add_file(too_big_file)
    with pytest.raises(StoreFull):
        small_store.log_artifact(art)


def test_large_file_bigger_than_the_disk_leaves_no_temp_files(small_store: Store, too_big_file: Path) -> None:
    art = Artifact("huge", type="model")
    art.add_file(too_big_file)
    with pytest.raises(ArtifactFSError):
        small_store.log_artifact(art)
    assert temp_files(small_store) == []
    assert small_store.artifacts() == ["seed"]


def test_cli_log_bigger_than_the_disk_prints_one_line_and_fails(
        small_store: Store, small_fs: Path, too_big_tree: Path, cli) -> None:
    r = cli("log", "big", too_big_tree, store=small_fs / "store")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "full" in lines[0], r.stderr


def test_cli_log_bigger_than_the_disk_records_nothing(
        small_store: Store, small_fs: Path, too_big_tree: Path, cli) -> None:
    cli("log", "big", too_big_tree, store=small_fs / "store")
    assert small_store.artifacts() == ["seed"]
    assert temp_files(small_store) == []


# -- the catalog does not fit -------------------------------------------------------------------


def many_tracked_refs(name: str, n: int = 4000) -> Artifact:
    """A draft of n tracked references: no blob to write, a lot of catalog rows."""
    art = Artifact(name, type="dataset")
    for i in range(n):
        art.add_reference(f"s3://a-bucket-with-a-long-name/some/deep/prefix/object-{i:06d}.parquet", checksum=False)
    return art


def test_catalog_on_a_full_disk_raises_store_full(small_store: Store, small_fs: Path) -> None:
    fill(small_fs)
    with pytest.raises(StoreFull):
        small_store.log_artifact(many_tracked_refs("refs"))


def test_catalog_on_a_full_disk_records_nothing(small_store: Store, small_fs: Path) -> None:
    fill(small_fs)
    with pytest.raises(ArtifactFSError):
        small_store.log_artifact(many_tracked_refs("refs"))
    assert small_store.artifacts() == ["seed"]


def test_store_is_usable_once_the_full_catalog_disk_has_room(small_store: Store, small_fs: Path) -> None:
    filler = fill(small_fs)
    with pytest.raises(ArtifactFSError):
        small_store.log_artifact(many_tracked_refs("refs"))
    filler.unlink()
    v = small_store.log_artifact(many_tracked_refs("refs"))
    assert v.file_count == 4000
    report = small_store.fsck()
    assert report.ok, [str(d) for d in report.damage]


def test_blob_write_on_a_full_disk_raises_store_full_and_leaves_no_temp(small_store: Store, small_fs: Path) -> None:
    fill(small_fs)
    with pytest.raises(StoreFull):
        log_small(small_store)
    assert temp_files(small_store) == []
    assert small_store.artifacts() == ["seed"]
