"""The FUSE-free core: what a mounted store looks like, tested without any mount."""

from __future__ import annotations

import errno
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import pytest
from helpers import StoredBlob, catalog_sql, log_files

from artifactfs import Artifact, Store
from artifactfs.fuse import view as vfs_mod
from artifactfs.fuse.view import (
    ROOT_INODE,
    VFS,
    BlobFile,
    Dir,
    Link,
    NeedsHash,
    RefFile,
    VersionInfo,
    VersionRoot,
)
from artifactfs.refs.file import file_uri


def make_vfs(store: Store, **kw: Any) -> VFS:
    v = VFS(store.catalog, store.blobs, **kw)
    v.apply_snapshot(store.catalog.snapshot())
    return v


def walk(v: VFS, path: str) -> Any:
    ino = ROOT_INODE
    node: Any = v.node(ino)
    for part in path.split("/"):
        if part:
            node = v.lookup(ino, part.encode())
            ino = node.ino
    return node


def read_all(v: VFS, node: Any) -> bytes:
    h = v.open(node, may_hash=True)
    try:
        buf = bytearray(h.size + 1)  # one more than its size: a short read at the end
        return bytes(buf[:h.reader.readinto(memoryview(buf), 0)])
    finally:
        h.close()


@pytest.fixture
def two_versions(store: Store) -> Store:
    log_files(store, "ds", {"a.txt": b"one\n", "sub/b.bin": b"\x00\x01"}, aliases=("best",))
    log_files(store, "ds", {"a.txt": b"two\n", "sub/deep/c.txt": b"c"})
    return store


def test_root_lists_artifacts_and_artifact_dir_lists_versions_and_aliases(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    assert [n.name for n in v.listing(ROOT_INODE)] == [b"ds"]
    ds = walk(v, "ds")
    names = sorted(n.name for n in v.listing(ds.ino))
    assert names == [b"best", b"latest", b"v0", b"v1"]


def test_aliases_are_symlinks_to_version_directories(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    assert v.readlink(walk(v, "ds/latest")) == b"v1"
    assert v.readlink(walk(v, "ds/best")) == b"v0"
    assert stat.S_ISLNK(v.attr(walk(v, "ds/best")).mode)


def test_version_tree_holds_entries_and_implicit_directories(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    assert sorted(n.name for n in v.listing(walk(v, "ds/v1").ino)) == [b"a.txt", b"sub"]
    assert isinstance(walk(v, "ds/v1/sub/deep"), Dir)
    assert read_all(v, walk(v, "ds/v1/sub/deep/c.txt")) == b"c"
    assert read_all(v, walk(v, "ds/v0/a.txt")) == b"one\n"


def test_missing_name_raises_not_found(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    with pytest.raises(KeyError):
        walk(v, "ds/v1/nope")
    with pytest.raises(KeyError):
        walk(v, "nope")


def test_version_tree_is_built_lazily_on_first_access(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    vr = walk(v, "ds/v0")
    assert isinstance(vr, VersionRoot) and vr.children is None
    walk(v, "ds/v0/a.txt")
    assert vr.children is not None
    assert walk(v, "ds/v1").children is None  # other versions stay unbuilt


def test_built_tree_needs_no_catalog(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    node = walk(v, "ds/v1/sub/deep/c.txt")

    class NoCatalog:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"catalog.{name} used after the tree was built")

    v.catalog = NoCatalog()
    again = walk(v, "ds/v1/sub/deep/c.txt")
    assert again is node
    assert v.attr(again).size == 1
    assert read_all(v, again) == b"c"


def test_attributes_are_read_only_with_version_mtime(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    created = two_versions.artifact("ds:v1").created_at.timestamp()
    f = v.attr(walk(v, "ds/v1/a.txt"))
    d = v.attr(walk(v, "ds/v1/sub"))
    assert f.mode == stat.S_IFREG | 0o444 and f.size == 4
    assert d.mode == stat.S_IFDIR | 0o555
    assert f.mtime_ns == d.mtime_ns and abs(f.mtime_ns - int(created * 1e9)) < 1000  # created_at: microseconds
    assert f.entry_stable and f.attr_stable
    top = v.attr(walk(v, "ds"))
    assert not top.entry_stable and not top.attr_stable


def test_inode_numbers_are_stable_across_instances(two_versions: Store) -> None:
    a = make_vfs(two_versions)
    b = make_vfs(Store(two_versions.root))
    for path in ["ds", "ds/v0", "ds/v1/a.txt", "ds/v1/sub/deep", "ds/latest"]:
        assert walk(a, path).ino == walk(b, path).ino, path


def test_inode_numbers_differ_between_versions_and_paths(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    inos = [walk(v, p).ino for p in ["ds/v0/a.txt", "ds/v1/a.txt", "ds/v0/sub", "ds/v1/sub", "ds", "ds/v0"]]
    assert len(set(inos)) == len(inos)
    assert ROOT_INODE not in inos


def test_inode_collisions_get_distinct_numbers(two_versions: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every key hashes into 40 values: collisions everywhere, still one inode per node.
    monkeypatch.setattr(vfs_mod.xxhash, "xxh3_64_intdigest", lambda k: 2 + zlib.crc32(k) % 40)
    v = make_vfs(two_versions)
    paths = ["ds", "ds/v0", "ds/v1", "ds/best", "ds/latest", "ds/v1/a.txt", "ds/v0/a.txt",
             "ds/v0/sub", "ds/v1/sub", "ds/v1/sub/deep", "ds/v1/sub/deep/c.txt", "ds/v0/sub/b.bin"]
    nodes = [walk(v, p) for p in paths]
    assert len({n.ino for n in nodes}) == len(nodes)
    for n in nodes:
        assert v.node(n.ino) is n
    assert read_all(v, walk(v, "ds/v1/sub/deep/c.txt")) == b"c"


def test_collision_resolution_rehashes_with_a_counter(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    v = VFS(store.catalog, store.blobs)
    monkeypatch.setattr(vfs_mod.xxhash, "xxh3_64_intdigest", lambda k: 1234 if b"#" not in k else 99 + len(k))
    first = v._new_ino(b"key-a")
    v._inodes[first] = Dir(first, b"x", None, None)
    second = v._new_ino(b"key-b")
    assert first == 1234 and second != first


def test_xattrs_hold_digest_and_ref(two_versions: Store, tmp_path: Path) -> None:
    v = make_vfs(two_versions)
    node = walk(v, "ds/v1/a.txt")
    assert v.xattrs(node) == {b"user.artifactfs.digest": node.digest.encode()}
    assert len(node.digest) == 64
    assert v.xattrs(walk(v, "ds/v1/sub")) == {}


def test_single_version_mode_puts_the_version_at_the_root(two_versions: Store) -> None:
    av = two_versions.artifact("ds:best")
    v = VFS(two_versions.catalog, two_versions.blobs, version=VersionInfo(av.id, av.name, av.index, av.created_at.timestamp()))
    v.apply_snapshot(two_versions.catalog.snapshot())
    assert sorted(n.name for n in v.listing(ROOT_INODE)) == [b"a.txt", b"sub"]
    assert read_all(v, walk(v, "a.txt")) == b"one\n"
    assert v.attr(walk(v, "")).mode == stat.S_IFDIR | 0o555
    assert walk(v, "sub").ino == make_vfs(two_versions).lookup(walk(make_vfs(two_versions), "ds/v0").ino, b"sub").ino


def test_new_version_is_reported_for_invalidation(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    ds = walk(v, "ds")
    assert not v.refresh_needed()
    log_files(two_versions, "ds", {"a.txt": b"three\n"})
    assert v.refresh_needed()
    inv = v.apply_snapshot(two_versions.catalog.snapshot())
    assert (ds.ino, b"latest") in inv.entries
    assert ds.ino in inv.inodes
    assert v.readlink(walk(v, "ds/latest")) == b"v2"
    assert not v.refresh_needed()


def test_new_artifact_appears_after_refresh(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    log_files(two_versions, "other", {"x": b"x"})
    inv = v.apply_snapshot(two_versions.catalog.snapshot())
    assert ROOT_INODE in inv.inodes
    assert read_all(v, walk(v, "other/v0/x")) == b"x"


def test_deleted_version_disappears_and_its_tree_is_freed_after_forget(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    ds = walk(v, "ds")
    f = walk(v, "ds/v0/a.txt")
    v.remember(f)  # the kernel holds it
    two_versions.delete("ds:v0", delete_aliases=True)
    inv = v.apply_snapshot(two_versions.catalog.snapshot())
    assert (ds.ino, b"v0") in inv.entries and (ds.ino, b"best") in inv.entries
    with pytest.raises(KeyError):
        walk(v, "ds/v0")
    assert v.node(f.ino) is f  # still answerable while the kernel knows it
    v.forget(f.ino, 1)
    with pytest.raises(KeyError):
        v.node(f.ino)


def test_moved_alias_gets_a_new_inode(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    old = walk(v, "ds/best")
    two_versions.set_alias("ds:v1", "best")
    v.apply_snapshot(two_versions.catalog.snapshot())
    new = walk(v, "ds/best")
    assert new.ino != old.ino and v.readlink(new) == b"v1"


def test_lookup_counts_follow_remember_and_forget(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    f = walk(v, "ds/v1/a.txt")
    v.remember(f)
    v.remember(f)
    assert v.lookup_count(f.ino) == 2
    v.forget(f.ino, 2)
    assert v.lookup_count(f.ino) == 0
    v.forget(12345, 1)  # unknown inodes are ignored


# -- references -------------------------------------------------------------------------------


@pytest.fixture
def ref_store(store: Store, tmp_path: Path) -> tuple[Store, Path]:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    (ref_dir / "r.bin").write_bytes(b"referenced bytes")
    (ref_dir / "loose.txt").write_bytes(b"loose")
    art = Artifact("refs", type="dataset")
    art.add_reference(file_uri(str(ref_dir / "r.bin")), checksum=True)
    art.add_reference(file_uri(str(ref_dir / "loose.txt")), checksum=False)
    art.add_reference("s3://bucket/key.bin", name="tracked.bin", checksum=False)
    art.add_reference(file_uri(str(ref_dir)), name="trackdir", checksum=False)
    store.log_artifact(art)
    return store, ref_dir


def test_checksummed_reference_is_served_in_place(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    assert isinstance(node, RefFile) and node.checked
    assert read_all(v, node) == b"referenced bytes"
    assert v.xattrs(node)[b"user.artifactfs.ref"] == file_uri(str(ref_dir / "r.bin")).encode()


def test_changed_checksummed_reference_fails_with_eio(ref_store: tuple[Store, Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    (ref_dir / "r.bin").write_bytes(b"REFERENCED BYTES")
    with pytest.raises(NeedsHash):
        v.open(node, may_hash=False)
    with pytest.raises(OSError) as ei:
        v.open(node, may_hash=True)
    assert ei.value.errno == errno.EIO
    assert "refs:v0/r.bin" in caplog.text and "changed" in caplog.text
    # The same bad state is known: no second hash, no second log line.
    caplog.clear()
    with pytest.raises(OSError):
        v.open(node, may_hash=False)
    assert caplog.text == ""


def test_changed_reference_is_served_from_blob_when_present(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    log_files(store, "copy", {"same.bin": b"referenced bytes"})  # puts the logged content in a blob
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    (ref_dir / "r.bin").write_bytes(b"something else entirely")
    assert read_all(v, node) == b"referenced bytes"


def test_missing_checksummed_reference_fails_with_eio(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    (ref_dir / "r.bin").unlink()
    with pytest.raises(OSError) as ei:
        v.open(walk(v, "refs/v0/r.bin"), may_hash=True)
    assert ei.value.errno == errno.EIO


def test_touched_but_unchanged_reference_is_rehashed_once_and_served(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    os.utime(ref_dir / "r.bin", ns=(1, 1))
    with pytest.raises(NeedsHash):
        v.open(node, may_hash=False)
    assert read_all(v, node) == b"referenced bytes"
    h = v.open(node, may_hash=False)  # the new stat is now known good
    os.close(h.fd)


def test_reference_in_doubt_is_rehashed_at_next_open(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    h = v.open(node, may_hash=False)
    os.close(h.fd)
    v.mark_in_doubt(str(ref_dir / "r.bin"))
    with pytest.raises(NeedsHash):
        v.open(node, may_hash=False)
    assert read_all(v, node) == b"referenced bytes"


def test_reference_changed_while_open_fails_reads(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/r.bin")
    h = v.open(node, may_hash=True)
    try:
        with open(ref_dir / "r.bin", "r+b") as f:
            f.write(b"X")
        v.mark_in_doubt(str(ref_dir / "r.bin"))
        with pytest.raises(OSError) as ei:
            v.read_check(h, 0, 4, os.pread(h.fd, 4, 0))
        assert ei.value.errno == errno.EIO
    finally:
        os.close(h.fd)


def test_unchecked_reference_shows_live_size(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/loose.txt")
    (ref_dir / "loose.txt").write_bytes(b"now longer")
    assert v.attr(node).size == len(b"now longer")
    assert not v.attr(node).attr_stable
    assert read_all(v, node) == b"now longer"


def test_reference_keeps_owner_group_and_mode_without_write_bits(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    if os.getuid() != 0:
        pytest.skip("chown needs root")
    os.chown(ref_dir / "r.bin", 1234, 5678)
    os.chmod(ref_dir / "r.bin", 0o640)
    v = make_vfs(store)
    a = v.attr(walk(v, "refs/v0/r.bin"))
    assert (a.uid, a.gid, stat.S_IMODE(a.mode)) == (1234, 5678, 0o440)


def test_tracked_reference_is_a_symlink_to_its_uri(ref_store: tuple[Store, Path]) -> None:
    store, _ = ref_store
    v = make_vfs(store)
    node = walk(v, "refs/v0/tracked.bin")
    assert isinstance(node, Link)
    assert v.readlink(node) == b"s3://bucket/key.bin"
    # Linux refuses user.* xattrs on symlinks before asking FUSE: listing them would mislead.
    assert v.xattrs(node) == {}


def test_corrupt_blob_fails_with_eio_when_verifying(two_versions: Store) -> None:
    v = make_vfs(two_versions, verify_blobs=True)
    node = walk(v, "ds/v1/a.txt")
    assert isinstance(node, BlobFile)
    StoredBlob(two_versions.root, node.blob).write_bytes(b"TWO\n")
    with pytest.raises(NeedsHash):
        v.open(node, may_hash=False)
    with pytest.raises(OSError) as ei:
        v.open(node, may_hash=True)
    assert ei.value.errno == errno.EIO


def test_missing_blob_fails_with_eio(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    node = walk(v, "ds/v1/a.txt")
    StoredBlob(two_versions.root, node.blob).remove_file()
    with pytest.raises(OSError) as ei:
        v.open(node, may_hash=False)
    assert ei.value.errno == errno.EIO


def test_opening_a_directory_is_eisdir(two_versions: Store) -> None:
    v = make_vfs(two_versions)
    with pytest.raises(OSError) as ei:
        v.open(walk(v, "ds/v1/sub"), may_hash=False)
    assert ei.value.errno == errno.EISDIR


def test_watch_callback_gets_directories_of_checksummed_references(ref_store: tuple[Store, Path]) -> None:
    store, ref_dir = ref_store
    seen: list[str] = []
    v = make_vfs(store, watch=seen.append)
    walk(v, "refs/v0")
    v.listing(walk(v, "refs/v0").ino)
    assert seen == [str(ref_dir)]


def test_a_forged_symlink_that_would_lead_out_of_the_version_is_defused(store) -> None:
    """A symlink row only a damaged or forged catalog could hold shows with its slashes escaped."""
    from helpers import log_files

    v = log_files(store, "ds", {"a.txt": b"a"})
    catalog_sql(store.root, "INSERT INTO entries (version_id, path, digest, size, kind, target) "
                "VALUES (?, ?, ?, ?, ?, ?)", (v.id, "evil", "x", 3, "symlink", "../../../../etc/passwd"))
    vfs = make_vfs(store)
    link = walk(vfs, "ds/v0/evil")
    assert vfs.readlink(link) == b"..%2F..%2F..%2F..%2Fetc%2Fpasswd"
