"""The API over a second BlobBackend (MemoryBlobs): what the store does with blobs goes through
the protocol alone, so a log, a read, a download, verify, fsck and gc work with no blob file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from artifactfs import Artifact, ArtifactFSError, Store
from artifactfs.blobs.memory import MemoryBlobs


@pytest.fixture
def mem_store(store_root: Path):
    s = Store(store_root, blobs=MemoryBlobs())
    yield s
    s.close()


def test_log_read_download_verify_over_memory_blobs(mem_store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(str(data_dir))
    v = mem_store.log_artifact(art)
    assert not (Path(mem_store.root) / "blobs").exists()  # no blob file anywhere
    assert mem_store.blobs.has(v.get_path("a.txt").blob or "")
    got = mem_store.artifact("ds:v0")
    one = Path(got.get_path("sub/b.bin").download(str(tmp_path / "one")))
    assert one.read_bytes() == (data_dir / "sub/b.bin").read_bytes()
    out = Path(got.download(str(tmp_path / "out")))
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert (out / p.relative_to(data_dir)).read_bytes() == p.read_bytes()
    got.verify(str(out))  # raises on any difference
    (out / "a.txt").chmod(0o644)
    (out / "a.txt").write_bytes(b"changed\n")
    with pytest.raises(ArtifactFSError):
        got.verify(str(out))
    assert mem_store.fsck().ok


def test_gc_frees_the_blobs_of_a_deleted_version_over_memory_blobs(mem_store: Store, tmp_path: Path) -> None:
    for text in ("first\n", "second\n"):
        art = Artifact("ds", type="dataset")
        with art.new_file("f.txt") as f:
            f.write(text)
        art.add({"text": text}, "obj")
        mem_store.log_artifact(art)
    first = mem_store.artifact("ds:v0").get_path("f.txt").blob or ""
    mem_store.delete("ds:v0")
    report = mem_store.gc()
    assert first in report.freed and report.blobs_freed == 2  # its file and its object
    assert mem_store.artifact("ds:v1").get("obj") == {"text": "second\n"}
    assert not mem_store.blobs.has(first)
    kept = Path(mem_store.artifact("ds:v1").get_path("f.txt").download(str(tmp_path / "kept")))
    assert kept.read_bytes() == b"second\n"


def test_fsck_finds_and_quarantines_a_damaged_memory_blob(mem_store: Store) -> None:
    art = Artifact("ds", type="dataset")
    with art.new_file("f.txt") as f:
        f.write("intact\n")
    oid = mem_store.log_artifact(art).get_path("f.txt").blob or ""
    blobs = mem_store.blobs
    assert isinstance(blobs, MemoryBlobs)
    blobs._blobs[oid] = (b"damaged\n", blobs._blobs[oid][1])  # what a bad disk would do
    assert not mem_store.fsck().ok
    report = mem_store.fsck(repair=True)
    assert not blobs.has(oid) and oid in blobs.quarantined
    assert any(oid in str(d) for d in report.damage)
    assert os.path.basename(mem_store.root) == "store"
