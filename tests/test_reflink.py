"""On a filesystem with reflinks (XFS on a loop device), blobs share extents with their source."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifactfs import Artifact, Store
from artifactfs.blobs.packs import PACK_MAX


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a loop device")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (apt install xfsprogs)")
    img = tmp_path / "xfs.img"
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(320 << 20)  # XFS's smallest comfortable size
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(img)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def shared_extents(path: str) -> bool:
    out = subprocess.run(["filefrag", "-v", path], capture_output=True, text=True).stdout
    return "shared" in out


@pytest.mark.parametrize("size", [PACK_MAX + 100_000, 20 << 20], ids=["small", "large"])  # a file of its own
def test_blob_is_a_reflink_clone_of_its_source(xfs: Path, size: int) -> None:
    src = xfs / "src.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    store = Store(xfs / "store")
    a = Artifact("x")
    a.add_file(str(src))
    v = store.log_artifact(a)
    blob = store.blobs.path(v.get_path("src.bin").blob or "")
    assert not store.blobs.no_reflink_from
    assert shared_extents(blob), "the blob does not share extents with its source"
    assert Path(blob).read_bytes() == data
    v.verify()
    # The user's file changing in place must not change the blob (copy-on-write).
    with open(src, "r+b") as f:
        f.write(b"\0" * 16)
    assert Path(blob).read_bytes() == data
    store.close()


def test_a_failed_clone_from_another_filesystem_leaves_reflinks_on_for_this_one(xfs: Path, tmp_path: Path) -> None:
    """A draft's temp file (or any source off the store's filesystem) cannot be cloned; that must
    not turn reflinks off for sources on the store's own filesystem."""
    store = Store(xfs / "store")
    elsewhere = Artifact("x")
    with elsewhere.new_file("staged.bin", mode="wb") as f:  # staged in $TMPDIR, not on the XFS
        f.write(os.urandom(PACK_MAX + 100_000))
    store.log_artifact(elsewhere)
    assert store.blobs.no_reflink_from  # that clone failed, and was remembered for its filesystem
    src = xfs / "src.bin"
    src.write_bytes(os.urandom(PACK_MAX + 100_000))
    a = Artifact("y")
    a.add_file(str(src))
    blob = store.blobs.path(store.log_artifact(a).get_path("src.bin").blob or "")
    assert shared_extents(blob), "a clone from the store's own filesystem was not even tried"
    store.close()
