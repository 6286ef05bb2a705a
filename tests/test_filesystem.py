"""The fsspec filesystem: read artifacts without a mount (`fsspec.filesystem("artifactfs", root=R)`)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import fsspec
import pytest
from helpers import StoredBlob, log_files

from artifactfs import Artifact, Store
from artifactfs.filesystem import ArtifactFileSystem

FILES = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40, "sub/deep/c.txt": b"gamma\n"}


@pytest.fixture
def fs(store: Store) -> ArtifactFileSystem:
    log_files(store, "ds", {"a.txt": b"old\n"}, aliases=["best"])
    log_files(store, "ds", FILES)
    return fsspec.filesystem("artifactfs", root=store.root, skip_instance_cache=True)


def test_the_entry_point_registers_the_protocol() -> None:
    assert fsspec.get_filesystem_class("artifactfs") is ArtifactFileSystem


def test_root_lists_artifacts_and_a_bare_name_is_latest(fs: ArtifactFileSystem) -> None:
    assert fs.ls("", detail=False) == ["ds"]
    assert sorted(fs.ls("ds", detail=False)) == ["ds/a.txt", "ds/sub"]
    assert fs.cat_file("ds/a.txt") == b"alpha\n"
    assert fs.cat_file("ds:v0/a.txt") == fs.cat_file("ds:best/a.txt") == b"old\n"


def test_info_find_and_exists(fs: ArtifactFileSystem) -> None:
    i = fs.info("ds:latest/sub/b.bin")
    assert (i["type"], i["size"]) == ("file", len(FILES["sub/b.bin"]))
    assert fs.info("ds:v1/sub")["type"] == "directory"
    assert sorted(fs.find("ds:v1")) == ["ds:v1/a.txt", "ds:v1/sub/b.bin", "ds:v1/sub/deep/c.txt"]
    assert fs.exists("ds:v1/sub/deep/c.txt") and not fs.exists("ds:v1/nope") and not fs.exists("nope:v0/a")
    with pytest.raises(FileNotFoundError):
        fs.info("ds:v7/a.txt")


def test_open_seeks_and_reads_ranges_from_the_blob(fs: ArtifactFileSystem, store: Store) -> None:
    data = FILES["sub/b.bin"]
    with fs.open("artifactfs://ds:v1/sub/b.bin", "rb") as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        assert f.size == len(data)
        # Straight from the blob: the open descriptor is its pack's (no copy was made).
        assert os.path.samefile(f"/proc/self/fd/{f._rr.reader.fd}",
                                StoredBlob(store.root, store.artifact("ds:v1").get_path("sub/b.bin").blob or "")
                                .location()[0])
    assert fs.cat_file("ds/sub/b.bin", start=-16) == data[-16:]
    assert fs.cat_file("ds/sub/b.bin", start=5, end=9) == data[5:9]


def test_every_write_is_refused(fs: ArtifactFileSystem) -> None:
    for call in (lambda: fs.open("ds/new.txt", "wb"), lambda: fs.rm("ds/a.txt"), lambda: fs.mkdir("ds/d"),
                 lambda: fs.pipe_file("ds/a.txt", b"x"), lambda: fs.touch("ds/t"), lambda: fs.mv("ds/a.txt", "ds/b")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EROFS
    assert fs.cat_file("ds/a.txt") == b"alpha\n"


def test_symlinks_are_followed_and_empty_dirs_listed(store: Store, tmp_path: Path) -> None:
    t = tmp_path / "t"
    (t / "d").mkdir(parents=True)
    (t / "empty").mkdir()
    (t / "d" / "x.txt").write_text("x\n")
    os.symlink("d", t / "link-dir")
    os.symlink("d/x.txt", t / "link-file")
    art = Artifact("tree", type="dataset")
    art.add_dir(t)
    store.log_artifact(art)
    fs = ArtifactFileSystem(root=store.root, skip_instance_cache=True)
    assert fs.cat_file("tree/link-file") == fs.cat_file("tree/link-dir/x.txt") == b"x\n"
    assert fs.info("tree/link-dir")["islink"] and fs.info("tree/link-dir")["type"] == "directory"
    assert fs.ls("tree/empty") == []


def test_pandas_reads_parquet_through_the_url(store: Store, tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pandas.DataFrame({"x": list(range(100)), "y": [f"r{i}" for i in range(100)]})
    df.to_parquet(tmp_path / "t.parquet")
    art = Artifact("ds", type="dataset")
    art.add_file(tmp_path / "t.parquet")
    store.log_artifact(art)
    got = pandas.read_parquet("artifactfs://ds:latest/t.parquet", storage_options={"root": store.root})
    assert got.equals(df)


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    from artifactfs import ArtifactFSError

    with pytest.raises(ArtifactFSError, match="no store at"):
        fsspec.filesystem("artifactfs", root=str(tmp_path / "nowhere"), skip_instance_cache=True)


def test_a_reference_whose_stat_changed_but_not_its_bytes_reads_whole(store: Store, tmp_path: Path) -> None:
    """A changed fingerprint means a re-hash; the reader must then start at the first byte."""
    src = tmp_path / "ref.bin"
    data = os.urandom(100_000)
    src.write_bytes(data)
    art = Artifact("r", type="dataset")
    art.add_reference(f"file://{src}")
    store.log_artifact(art)
    os.chmod(src, 0o600)  # a new ctime, the same bytes
    fs = ArtifactFileSystem(root=store.root, skip_instance_cache=True)
    with fs.open("r/ref.bin") as f:
        assert f.read() == data
    assert fs.cat_file("r/ref.bin", start=10, end=20) == data[10:20]


def test_a_reference_rewritten_while_open_fails_to_read_rather_than_hand_out_other_bytes(
        store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ref.bin"
    src.write_bytes(os.urandom(1 << 20))
    art = Artifact("r", type="dataset")
    art.add_reference(f"file://{src}")
    store.log_artifact(art)
    fs = ArtifactFileSystem(root=store.root, skip_instance_cache=True)
    with fs.open("r/ref.bin") as f:
        f.read(10)
        with open(src, "r+b") as w:  # the same inode, other bytes
            w.write(b"\0" * (1 << 20))
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
